//! The block record: one block's payload with everything needed to check,
//! when it is read back, that it is exactly the block asked for.
//!
//! # Format, version 1 (little-endian throughout)
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 8 | magic `KVSBLOCK` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | header length `H`: a multiple of 4096 |
//! | 16 | 16 | [`StoreFingerprint`] (model, tokenizer, cache and payload layout) |
//! | 32 | 16 | namespace (model and tenant) |
//! | 48 | 16 | block address (chained hash) |
//! | 64 | 1 | layer group |
//! | 65 | 1 | 1 if the block has a parent, else 0 |
//! | 66 | 2 | zero |
//! | 68 | 16 | parent address (zero without a parent) |
//! | 84 | 4 | token count `n` |
//! | 88 | 8 | payload length `P` |
//! | 96 | 8 | payload checksum: xxh3-64 of the payload |
//! | 104 | 4n | the block's token ids |
//! | 104 + 4n | 8 | header checksum: xxh3-64 of bytes `0 .. 104 + 4n` |
//! | … | | zero padding to `H` |
//! | H | P | payload, in the storage's layout (named by the fingerprint) |
//!
//! With 16-token blocks `H` is 4096, so a 368,640-byte payload (90 pages)
//! starts page-aligned and the record reads with direct I/O. A remote tier
//! can store the same bytes unchanged: the record is self-describing.
//!
//! # Reading back
//!
//! [`verify`] checks, in order: length, magic, version, header length,
//! header checksum, fingerprint, that the stored address really hashes the
//! stored namespace, parent and tokens, that they are the ones expected,
//! then the payload's length and checksum. Any failure is a [`Reject`]: the
//! caller treats it as a miss and deletes the record.

use kv::{BlockHash, BlockKey, Namespace, TokenId};
use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

/// The magic at offset 0.
pub const MAGIC: &[u8; 8] = b"KVSBLOCK";
/// The format version written.
pub const VERSION: u32 = 1;
/// Header alignment (a page).
pub const ALIGN: usize = 4096;
const FIXED: usize = 104;

/// Which layer group (pool) a block belongs to: 0 for a model whose layers
/// all attend the same way; a hybrid model (Gemma-3) has one group per
/// attention kind, each with its own blocks.
pub type GroupId = u8;

/// The name of one stored block: its layer group and address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordKey {
    /// The layer group.
    pub group: GroupId,
    /// The block's address.
    pub hash: BlockHash,
}

impl RecordKey {
    /// The key of `hash` in `group`.
    pub const fn new(group: GroupId, hash: BlockHash) -> Self {
        Self { group, hash }
    }

    /// The record's file name: `<hash>-g<group>.kvb`.
    pub fn file_name(&self) -> String {
        format!("{}-g{}.kvb", self.hash, self.group)
    }

    /// Parses a name made by [`RecordKey::file_name`].
    pub fn from_file_name(name: &str) -> Option<Self> {
        let (hash, group) = name.strip_suffix(".kvb")?.split_once("-g")?;
        let key = Self {
            group: group.parse().ok()?,
            hash: BlockHash::from_u128(u128::from_str_radix(hash, 16).ok().filter(|_| hash.len() == 32)?),
        };
        // Only the canonical spelling (lowercase, no leading zeros or signs).
        (key.file_name() == name).then_some(key)
    }
}

/// Identifies what a tier's payloads mean: the model (its fingerprint
/// covers every byte of the file: weights, tokenizer, template), the cache
/// layout (block size, element type, layers, heads, head size) and the
/// payload layout the storage describes. Stores with different
/// fingerprints live in different directories and never read each other's
/// records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StoreFingerprint([u8; 16]);

impl StoreFingerprint {
    /// The fingerprint of a model, its cache spec and its storage layouts
    /// (one per layer group).
    pub fn new(model_fingerprint: &[u8], spec: &kv::CacheSpec, layouts: &[String]) -> Self {
        let p = spec.params();
        let mut text = format!(
            "kvserve-store-v1|block={}|dtype={:?}|kv_heads={}|head_dim={}|layers={:?}",
            p.block_size, p.dtype, p.kv_heads, p.head_dim, p.layers
        );
        for l in layouts {
            text.push('|');
            text.push_str(l);
        }
        let mut bytes = Vec::with_capacity(model_fingerprint.len() + text.len() + 8);
        bytes.extend_from_slice(&(model_fingerprint.len() as u64).to_le_bytes());
        bytes.extend_from_slice(model_fingerprint);
        bytes.extend_from_slice(text.as_bytes());
        Self(xxh3_128(&bytes).to_le_bytes())
    }

    /// From raw bytes (tests, and records read back).
    pub const fn from_bytes(b: [u8; 16]) -> Self {
        Self(b)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// 32 hex digits: the store's directory name.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Why a stored record (or manifest) was not used. Every one is a miss: the
/// block is recomputed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Reject {
    /// Shorter than its header says (truncated, or zero-length).
    #[error("truncated: {len} bytes")]
    Truncated {
        /// Bytes present.
        len: usize,
    },
    /// Not a record of this program.
    #[error("bad magic")]
    BadMagic,
    /// A format version this build does not read.
    #[error("unsupported format version {0}")]
    Version(u32),
    /// The header length field is not a multiple of 4096 that fits.
    #[error("bad header length {0}")]
    HeaderLength(u32),
    /// The header's bytes do not match its checksum.
    #[error("header checksum mismatch")]
    HeaderChecksum,
    /// Written for another model, tokenizer or cache layout.
    #[error("another store's record (fingerprint mismatch)")]
    Fingerprint,
    /// The stored address is not the hash of the stored contents.
    #[error("the address does not hash the stored namespace, parent and tokens")]
    Inconsistent,
    /// A valid record of another block (misfiled, or an address collision).
    #[error("a record of another block ({what} differs)")]
    OtherBlock {
        /// The first field that differs.
        what: &'static str,
    },
    /// The payload is not the length the storage expects.
    #[error("payload of {got} bytes, expected {expected}")]
    PayloadLength {
        /// Bytes the storage expects.
        expected: usize,
        /// Bytes the record holds.
        got: usize,
    },
    /// The payload's bytes do not match its checksum.
    #[error("payload checksum mismatch")]
    PayloadChecksum,
    /// The file could not be read (other than not existing).
    #[error("unreadable: {0}")]
    Unreadable(String),
    /// The file is not there (evicted or deleted meanwhile).
    #[error("missing")]
    Missing,
}

impl Reject {
    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Truncated { .. } => "truncated",
            Self::BadMagic => "magic",
            Self::Version(_) => "version",
            Self::HeaderLength(_) => "header_length",
            Self::HeaderChecksum => "header_checksum",
            Self::Fingerprint => "fingerprint",
            Self::Inconsistent => "inconsistent",
            Self::OtherBlock { .. } => "misfiled",
            Self::PayloadLength { .. } => "payload_length",
            Self::PayloadChecksum => "payload_checksum",
            Self::Unreadable(_) => "unreadable",
            Self::Missing => "missing",
        }
    }

    /// Whether the file itself is bad (and should be deleted), as opposed to
    /// absent or unreadable for a passing reason.
    pub fn is_corrupt(&self) -> bool {
        !matches!(self, Self::Missing | Self::Unreadable(_))
    }
}

/// Header length for blocks of `tokens` tokens.
pub fn header_len(tokens: usize) -> usize {
    (FIXED + 4 * tokens + 8).div_ceil(ALIGN) * ALIGN
}

/// The header of a record of `key` in `group` with `payload`.
pub fn encode_header(fp: &StoreFingerprint, group: GroupId, key: &BlockKey, payload: &[u8]) -> Vec<u8> {
    let len = header_len(key.tokens.len());
    let mut h = Vec::with_capacity(len);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&(len as u32).to_le_bytes());
    h.extend_from_slice(fp.as_bytes());
    h.extend_from_slice(&key.ns.to_u128().to_le_bytes());
    h.extend_from_slice(&key.hash.to_u128().to_le_bytes());
    h.push(group);
    h.push(u8::from(key.parent.is_some()));
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&key.parent.map_or(0, BlockHash::to_u128).to_le_bytes());
    h.extend_from_slice(&(key.tokens.len() as u32).to_le_bytes());
    h.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    h.extend_from_slice(&xxh3_64(payload).to_le_bytes());
    for t in key.tokens.iter() {
        h.extend_from_slice(&t.to_le_bytes());
    }
    let sum = xxh3_64(&h);
    h.extend_from_slice(&sum.to_le_bytes());
    h.resize(len, 0);
    h
}

/// A record's payload, kept in the buffer it was read into (no copy).
#[derive(Clone, PartialEq, Eq)]
pub struct Payload {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payload({} bytes)", self.bytes().len())
    }
}

impl Payload {
    /// A payload held on its own.
    pub fn from_vec(buf: Vec<u8>) -> Self {
        Self { end: buf.len(), buf, start: 0 }
    }

    /// The payload bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn u128_at(b: &[u8], at: usize) -> u128 {
    let mut x = [0; 16];
    x.copy_from_slice(&b[at..at + 16]);
    u128::from_le_bytes(x)
}

/// What a record's header says, once its own checksum passed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The layer group.
    pub group: GroupId,
    /// The block.
    pub key: BlockKey,
    /// Header length (where the payload starts).
    pub len: usize,
    /// Payload length.
    pub payload_len: u64,
    /// Payload checksum.
    pub payload_sum: u64,
}

/// Parses and checks a header (everything but the payload).
///
/// # Errors
/// The [`Reject`] that applies.
pub fn decode_header(b: &[u8], fp: &StoreFingerprint) -> Result<Header, Reject> {
    if b.len() < FIXED + 8 {
        return Err(Reject::Truncated { len: b.len() });
    }
    if &b[..8] != MAGIC {
        return Err(Reject::BadMagic);
    }
    let version = u32_at(b, 8);
    if version != VERSION {
        return Err(Reject::Version(version));
    }
    let len = u32_at(b, 12);
    if len == 0 || !(len as usize).is_multiple_of(ALIGN) {
        return Err(Reject::HeaderLength(len));
    }
    let n = u32_at(b, 84) as usize;
    let sum_at = n.checked_mul(4).and_then(|t| t.checked_add(FIXED)).filter(|&e| e + 8 <= len as usize);
    let Some(sum_at) = sum_at else { return Err(Reject::HeaderLength(len)) };
    if b.len() < sum_at + 8 {
        return Err(Reject::Truncated { len: b.len() });
    }
    if xxh3_64(&b[..sum_at]) != u64_at(b, sum_at) {
        return Err(Reject::HeaderChecksum);
    }
    if b[16..32] != fp.as_bytes()[..] {
        return Err(Reject::Fingerprint);
    }
    let tokens: Box<[TokenId]> = (0..n).map(|i| u32_at(b, FIXED + 4 * i)).collect();
    let parent = match b[65] {
        0 => None,
        _ => Some(BlockHash::from_u128(u128_at(b, 68))),
    };
    let key = BlockKey {
        hash: BlockHash::from_u128(u128_at(b, 48)),
        parent,
        ns: Namespace::from_u128(u128_at(b, 32)),
        tokens,
    };
    if !key.is_consistent() {
        return Err(Reject::Inconsistent);
    }
    Ok(Header { group: b[64], key, len: len as usize, payload_len: u64_at(b, 88), payload_sum: u64_at(b, 96) })
}

/// Checks a whole record read back against the block expected and the
/// storage's payload size, and returns its payload.
///
/// # Errors
/// The first [`Reject`] that applies (see the module doc for the order).
pub fn verify(
    buf: Vec<u8>,
    fp: &StoreFingerprint,
    group: GroupId,
    expected: &BlockKey,
    payload_len: usize,
) -> Result<Payload, Reject> {
    let len = buf.len();
    verify_at(ReadBuf { buf, at: 0, len }, fp, group, expected, payload_len)
}

/// A record read into a buffer at an offset (direct I/O needs an aligned
/// destination, so the record may not start at the buffer's start).
#[derive(Debug)]
pub struct ReadBuf {
    /// The buffer.
    pub buf: Vec<u8>,
    /// Where the record starts in it.
    pub at: usize,
    /// The record's length.
    pub len: usize,
}

/// [`verify`] for a record at an offset of its buffer.
///
/// # Errors
/// As [`verify`].
pub fn verify_at(
    read: ReadBuf,
    fp: &StoreFingerprint,
    group: GroupId,
    expected: &BlockKey,
    payload_len: usize,
) -> Result<Payload, Reject> {
    let h = decode_header(&read.buf[read.at..read.at + read.len], fp)?;
    let differs = if h.group != group {
        Some("group")
    } else if h.key.hash != expected.hash {
        Some("address")
    } else if h.key.ns != expected.ns {
        Some("namespace")
    } else if h.key.parent != expected.parent {
        Some("parent")
    } else if h.key.tokens != expected.tokens {
        Some("tokens")
    } else {
        None
    };
    if let Some(what) = differs {
        return Err(Reject::OtherBlock { what });
    }
    payload_of(&h, read, payload_len)
}

/// Checks a whole record for itself (header, lengths, payload checksum),
/// with no block to compare it with, and returns what it says it holds and
/// its payload: how a record leaving a tier is passed on.
///
/// # Errors
/// The first [`Reject`] that applies; never [`Reject::OtherBlock`].
pub fn decode(read: ReadBuf, fp: &StoreFingerprint, payload_len: usize) -> Result<(Header, Payload), Reject> {
    let h = decode_header(&read.buf[read.at..read.at + read.len], fp)?;
    let payload = payload_of(&h, read, payload_len)?;
    Ok((h, payload))
}

/// The payload of a record whose header `h` passed: its length and
/// checksum checked.
fn payload_of(h: &Header, read: ReadBuf, payload_len: usize) -> Result<Payload, Reject> {
    let ReadBuf { buf, at, len } = read;
    let record = &buf[at..at + len];
    if h.payload_len != payload_len as u64 {
        return Err(Reject::PayloadLength {
            expected: payload_len,
            got: usize::try_from(h.payload_len).unwrap_or(usize::MAX),
        });
    }
    let end = h.len.checked_add(payload_len).filter(|&e| e <= record.len());
    let Some(end) = end else { return Err(Reject::Truncated { len: record.len() }) };
    if end != record.len() {
        return Err(Reject::PayloadLength { expected: payload_len, got: record.len() - h.len });
    }
    if xxh3_64(&record[h.len..end]) != h.payload_sum {
        return Err(Reject::PayloadChecksum);
    }
    Ok(Payload { start: at + h.len, end: at + end, buf })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> StoreFingerprint {
        StoreFingerprint::from_bytes([7; 16])
    }

    fn key() -> BlockKey {
        let ns = Namespace::new(b"model", b"tenant");
        let parent = BlockKey::new(ns, None, &[9; 16]);
        BlockKey::new(ns, Some(parent.hash), &(100..116).collect::<Vec<u32>>())
    }

    fn record(payload: &[u8]) -> Vec<u8> {
        let mut r = encode_header(&fp(), 0, &key(), payload);
        r.extend_from_slice(payload);
        r
    }

    #[test]
    fn round_trip_returns_the_payload_page_aligned() {
        let payload: Vec<u8> = (0..8192u32).map(|i| (i * 31) as u8).collect();
        let r = record(&payload);
        assert_eq!(r.len(), 4096 + payload.len(), "16 tokens fit one page of header");
        let got = verify(r, &fp(), 0, &key(), payload.len()).unwrap();
        assert_eq!(got.bytes(), &payload[..]);
    }

    #[test]
    fn truncation_at_every_length_is_rejected() {
        let payload = vec![5u8; 1000];
        let r = record(&payload);
        for cut in (0..r.len()).step_by(97).chain([0, 1, 111, 4095, 4096, r.len() - 1]) {
            let got = verify(r[..cut].to_vec(), &fp(), 0, &key(), payload.len());
            assert!(got.is_err(), "a record cut at {cut} bytes was accepted");
        }
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let payload = vec![3u8; 64];
        let r = record(&payload);
        // Header fields (checksummed), the padding is not read, the payload
        // is checksummed.
        let positions: Vec<usize> = (0..FIXED + 4 * 16 + 8).chain(4096..r.len()).collect();
        for &i in &positions {
            for bit in [0, 3, 7] {
                let mut bad = r.clone();
                bad[i] ^= 1 << bit;
                assert!(verify(bad, &fp(), 0, &key(), payload.len()).is_err(), "flip at byte {i} bit {bit} accepted");
            }
        }
    }

    #[test]
    fn other_version_fingerprint_group_or_block_is_a_typed_reject() {
        let payload = vec![1u8; 32];
        let mut v2 = record(&payload);
        v2[8] = 2;
        // The version is checked before the header checksum: a newer format
        // is named, not reported as corruption.
        assert_eq!(verify(v2, &fp(), 0, &key(), 32), Err(Reject::Version(2)));
        let other_fp = StoreFingerprint::from_bytes([8; 16]);
        assert_eq!(verify(record(&payload), &other_fp, 0, &key(), 32), Err(Reject::Fingerprint));
        assert_eq!(verify(record(&payload), &fp(), 1, &key(), 32), Err(Reject::OtherBlock { what: "group" }));
        let other = BlockKey::new(key().ns, None, &[1; 16]);
        assert_eq!(verify(record(&payload), &fp(), 0, &other, 32), Err(Reject::OtherBlock { what: "address" }));
        assert_eq!(
            verify(record(&payload), &fp(), 0, &key(), 64),
            Err(Reject::PayloadLength { expected: 64, got: 32 })
        );
        assert_eq!(verify(Vec::new(), &fp(), 0, &key(), 32), Err(Reject::Truncated { len: 0 }));
    }

    #[test]
    fn a_forged_address_with_a_valid_checksum_is_inconsistent() {
        let mut k = key();
        k.hash = BlockHash::from_u128(42);
        let mut r = encode_header(&fp(), 0, &k, &[0; 8]);
        r.extend_from_slice(&[0; 8]);
        assert_eq!(verify(r, &fp(), 0, &k, 8), Err(Reject::Inconsistent));
    }

    #[test]
    fn file_names_round_trip_and_others_are_refused() {
        let k = RecordKey::new(3, key().hash);
        assert_eq!(RecordKey::from_file_name(&k.file_name()), Some(k));
        for bad in
            ["x.kvb", "..kvb", "00-g0.kvb", &format!("{}-g0.kva", key().hash), &format!("{}-g01.kvb", key().hash)]
        {
            assert_eq!(RecordKey::from_file_name(bad), None, "{bad}");
        }
        assert_eq!(RecordKey::from_file_name(&k.file_name().to_uppercase()), None);
    }

    #[test]
    fn fingerprints_differ_by_model_block_size_and_dtype() {
        use kv::{AttentionKind, CacheSpec, CacheSpecParams, KvDType};
        let spec = |bs: u32, dtype| {
            CacheSpec::new(CacheSpecParams {
                block_size: bs,
                dtype,
                ..CacheSpecParams::uniform(2, AttentionKind::Full, 1, 8, 4)
            })
            .unwrap()
        };
        let a = StoreFingerprint::new(b"m1", &spec(16, KvDType::F16), &["l".into()]);
        assert_eq!(a, StoreFingerprint::new(b"m1", &spec(16, KvDType::F16), &["l".into()]));
        assert_ne!(a, StoreFingerprint::new(b"m2", &spec(16, KvDType::F16), &["l".into()]));
        assert_ne!(a, StoreFingerprint::new(b"m1", &spec(32, KvDType::F16), &["l".into()]));
        assert_ne!(a, StoreFingerprint::new(b"m1", &spec(16, KvDType::F32), &["l".into()]));
        assert_ne!(a, StoreFingerprint::new(b"m1", &spec(16, KvDType::F16), &["other layout".into()]));
        // Number of pool blocks is not part of it: a bigger pool reads the same records.
        let mut bigger = spec(16, KvDType::F16).params().clone();
        bigger.num_blocks = 100;
        assert_eq!(a, StoreFingerprint::new(b"m1", &CacheSpec::new(bigger).unwrap(), &["l".into()]));
    }
}
