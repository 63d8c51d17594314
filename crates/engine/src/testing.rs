//! A fake model and codec for tests (the engine's, the server's): cheap,
//! deterministic, and strict about the cache.
//!
//! [`FakeModel`] keeps one `u64` of "K/V" per cache slot. A token's value is
//! a hash of its own id and the value at the previous position, which it
//! reads *through the block table* — so, like attention, every output depends
//! on the whole history as stored in the blocks. If the engine hands it a
//! wrong block (a bad prefix adoption, a missed copy-on-write, a block freed
//! and reused too early, a tier that brings back the wrong payload), the
//! generated text changes. The next token is a lowercase letter or a space
//! chosen by the value, so output is readable. Its [`BlockStorage`] exports
//! a block as its slots' values, little-endian, so tiers see real payloads.
//!
//! Knobs shared with the test through [`FakeControl`]: a delay per step (to
//! exercise timeouts and concurrency), a step at which to fail (error
//! injection), and a log of every batch (to check scheduling).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kv::{AttentionKind, BlockCopy, BlockId, BlockStorage, CacheSpec, CacheSpecParams};
use model::{Batch, Message, Model, TextCodec};

/// The fake vocabulary: 256 byte tokens, then end-of-sequence.
pub const FAKE_VOCAB: usize = 257;
/// The fake end-of-sequence id.
pub const FAKE_EOS: u32 = 256;
const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz ";

/// Test-side controls of a [`FakeModel`].
#[derive(Debug, Default)]
pub struct FakeControl {
    /// Sleep this many milliseconds in every step.
    pub step_delay_ms: AtomicU64,
    /// Fail the step with this number (counting from 1); 0 never fails.
    pub fail_at_step: AtomicU64,
    /// Panic in the step with this number (counting from 1): the engine
    /// thread dies. 0 never panics.
    pub panic_at_step: AtomicU64,
    /// Steps run so far.
    pub steps: AtomicU64,
    /// Tokens per entry of every batch, in order.
    pub batches: Mutex<Vec<Vec<usize>>>,
}

/// See the module doc.
#[derive(Debug)]
pub struct FakeModel {
    spec: CacheSpec,
    storage: FakeStorage,
    control: Arc<FakeControl>,
    max_positions: usize,
}

/// The fake's "K/V": one value per slot.
#[derive(Debug)]
struct FakeStorage {
    slots: Vec<u64>,
    block_size: usize,
}

impl FakeStorage {
    fn check(&self, block: BlockId) -> kv::Result<usize> {
        let blocks = self.slots.len() / self.block_size;
        if block.index() >= blocks {
            return Err(kv::Error::BlockOutOfRange { block, blocks });
        }
        Ok(block.index() * self.block_size)
    }
}

impl BlockStorage for FakeStorage {
    fn layout(&self) -> String {
        format!("fake-u64-le block={}", self.block_size)
    }

    fn block_bytes(&self) -> usize {
        self.block_size * 8
    }

    fn export_block(&self, block: BlockId, out: &mut [u8]) -> kv::Result<()> {
        let at = self.check(block)?;
        if out.len() != self.block_bytes() {
            return Err(kv::Error::PayloadLength { expected: self.block_bytes(), got: out.len() });
        }
        for (o, v) in out.chunks_exact_mut(8).zip(&self.slots[at..at + self.block_size]) {
            o.copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }

    fn import_block(&mut self, block: BlockId, data: &[u8]) -> kv::Result<()> {
        let at = self.check(block)?;
        if data.len() != self.block_bytes() {
            return Err(kv::Error::PayloadLength { expected: self.block_bytes(), got: data.len() });
        }
        for (v, b) in self.slots[at..at + self.block_size].iter_mut().zip(data.chunks_exact(8)) {
            let mut raw = [0; 8];
            raw.copy_from_slice(b);
            *v = u64::from_le_bytes(raw);
        }
        Ok(())
    }

    fn copy_block(&mut self, copy: BlockCopy) -> kv::Result<()> {
        let (src, dst) = (self.check(copy.src)?, self.check(copy.dst)?);
        let n = copy.tokens as usize;
        if n > self.block_size {
            return Err(kv::Error::PayloadLength { expected: self.block_size, got: n });
        }
        self.slots.copy_within(src..src + n, dst);
        Ok(())
    }
}

impl FakeModel {
    /// A model over `num_blocks` blocks of `block_size` tokens.
    ///
    /// # Panics
    /// If the numbers make an invalid cache spec (a test bug).
    pub fn new(block_size: u32, num_blocks: u32) -> (Self, Arc<FakeControl>) {
        Self::with_attention(block_size, num_blocks, AttentionKind::Full)
    }

    /// A model whose one layer attends as `kind` says (a sliding window
    /// releases old blocks; the fake reads only the previous position, so
    /// any window of at least one token computes the same values).
    ///
    /// # Panics
    /// If the numbers make an invalid cache spec (a test bug).
    pub fn with_attention(block_size: u32, num_blocks: u32, kind: AttentionKind) -> (Self, Arc<FakeControl>) {
        let mut params = CacheSpecParams::uniform(1, kind, 1, 8, num_blocks);
        params.block_size = block_size;
        let spec = CacheSpec::new(params).expect("test cache spec is valid");
        let control = Arc::new(FakeControl::default());
        let storage =
            FakeStorage { slots: vec![0; spec.num_blocks() * spec.block_size()], block_size: block_size as usize };
        (Self { spec, storage, control: Arc::clone(&control), max_positions: 4096 }, control)
    }

    /// Value of a token given the value before it.
    fn mix(prev: u64, token: u32) -> u64 {
        let x = (prev ^ u64::from(token).wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^ (x >> 31)
    }

    fn run(&mut self, batch: Batch<'_>) -> model::Result<Vec<Vec<f32>>> {
        let step = self.control.steps.fetch_add(1, Ordering::SeqCst) + 1;
        self.control.batches.lock().expect("fake log lock").push(batch.seqs.iter().map(|s| s.tokens.len()).collect());
        let delay = self.control.step_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        if self.control.fail_at_step.load(Ordering::SeqCst) == step {
            return Err(model::Error::InvalidBatch("injected failure".into()));
        }
        #[allow(clippy::panic)] // the point: a test kills the engine thread
        if self.control.panic_at_step.load(Ordering::SeqCst) == step {
            panic!("injected engine-thread panic");
        }
        let bs = self.spec.block_size();
        let mut rows = Vec::with_capacity(batch.seqs.len());
        for s in batch.seqs {
            let index = |pos: usize| {
                s.table
                    .slot(pos, bs)
                    .map(|slot| slot.block.index() * bs + slot.offset as usize)
                    .ok_or_else(|| model::Error::InvalidBatch(format!("position {pos} has no block")))
            };
            let from = s.tokens.len() - s.rows_out();
            for (i, &t) in s.tokens.iter().enumerate() {
                let pos = s.start_pos + i;
                let prev = if pos == 0 { 0x5eed } else { self.storage.slots[index(pos - 1)?] };
                let value = Self::mix(prev, t);
                let at = index(pos)?;
                if s.slots.get(i).map(|slot| slot.block.index() * bs + slot.offset as usize) != Some(at) {
                    return Err(model::Error::InvalidBatch(format!("slot {i} does not match the block table")));
                }
                self.storage.slots[at] = value;
                if i >= from {
                    rows.push(Self::logits_of(value));
                }
            }
        }
        Ok(rows)
    }
}

impl FakeModel {
    /// The logit row after a position whose value is `value`: the next
    /// letter most likely, a runner-up, the rest far behind.
    fn logits_of(value: u64) -> Vec<f32> {
        let mut row = vec![-10.0; FAKE_VOCAB];
        let next = ALPHABET[(value % ALPHABET.len() as u64) as usize];
        let runner_up = ALPHABET[((value >> 8) % ALPHABET.len() as u64) as usize];
        row[usize::from(runner_up)] = 4.0;
        row[usize::from(next)] = 5.0;
        row
    }
}

impl Model for FakeModel {
    fn spec(&self) -> &CacheSpec {
        &self.spec
    }

    fn vocab_size(&self) -> usize {
        FAKE_VOCAB
    }

    fn max_positions(&self) -> usize {
        self.max_positions
    }

    fn fingerprint(&self) -> &[u8] {
        b"fake-model"
    }

    fn forward(&mut self, batch: Batch<'_>) -> model::Result<Vec<Vec<f32>>> {
        self.run(batch)
    }

    fn storage(&mut self) -> &mut dyn BlockStorage {
        &mut self.storage
    }
}

/// Bytes as tokens; chat rendered as `<role>: content\n` lines ending with
/// `assistant: `.
#[derive(Debug, Default)]
pub struct FakeCodec {
    stop: Vec<u32>,
}

impl FakeCodec {
    /// The codec, with [`FAKE_EOS`] as its stop id.
    pub fn new() -> Self {
        Self { stop: vec![FAKE_EOS] }
    }
}

impl TextCodec for FakeCodec {
    fn encode(&self, text: &str) -> model::Result<Vec<u32>> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn decode(&self, ids: &[u32]) -> model::Result<String> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= FAKE_VOCAB) {
            return Err(model::Error::Tokenizer(format!("id {bad} is outside the vocabulary")));
        }
        let bytes: Vec<u8> = ids.iter().filter_map(|&i| u8::try_from(i).ok()).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn encode_chat(&self, messages: &[Message]) -> model::Result<Vec<u32>> {
        let mut s: String = messages.iter().map(|m| format!("{}: {}\n", m.role, m.content)).collect();
        s.push_str("assistant: ");
        self.encode(&s)
    }

    fn max_token_bytes(&self) -> usize {
        1
    }

    fn token_bytes(&self, id: u32) -> model::Result<Vec<u8>> {
        match u8::try_from(id) {
            Ok(b) => Ok(vec![b]),
            Err(_) if (id as usize) < FAKE_VOCAB => Ok(Vec::new()),
            Err(_) => Err(model::Error::Tokenizer(format!("id {id} is outside the vocabulary"))),
        }
    }

    fn stop_ids(&self) -> &[u32] {
        &self.stop
    }

    fn is_control(&self, id: u32) -> bool {
        id == FAKE_EOS
    }

    fn vocabulary(&self) -> Vec<model::VocabEntry> {
        (0..FAKE_VOCAB)
            .map(|i| match u8::try_from(i) {
                Ok(b) => model::VocabEntry { bytes: vec![b], special: false },
                Err(_) => model::VocabEntry { bytes: b"<eos>".to_vec(), special: true },
            })
            .collect()
    }
}
