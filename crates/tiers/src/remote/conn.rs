//! What the remote tier's threads share about talking to Redis: each
//! thread's connection (made lazily, every call under a timeout, dropped
//! on failure and made again with backoff), the key names, the manifest
//! scripts, and a URL with its password hidden.
//!
//! # Keys
//!
//! Names come from hashes only, never from client strings, and put the
//! block address (or manifest id) in a hash tag (`{…}`), so a Redis Cluster
//! spreads records by address:
//!
//! ```text
//! kvs:<store fingerprint, 32 hex>:{<block address, 32 hex>}:g<group>   a block record (string)
//! kvs:<store fingerprint, 32 hex>:a:{<manifest id, 32 hex>}            an agent manifest (hash: turns, data)
//! ```
//!
//! # Reconnecting
//!
//! A call that fails (connection refused or reset, timeout, a reply that
//! does not parse) drops the thread's connection: a half-read reply would
//! leave the stream out of step. If the connection was an older one that
//! turned out closed (the store restarted, or a proxy dropped it while
//! idle), the call runs once more on a fresh connection: every call the
//! tier makes is idempotent (`SET NX`, `GETEX`, `DEL`, the manifest script
//! with the same turn). A connection made before the tier last recovered
//! from degraded is not trusted and is made again before use. Otherwise the
//! next use connects again, but not before a backoff (100 ms, doubling up
//! to twice the ping interval) unless the health check has seen the store
//! come back since, so no thread ever spins on a dead store.

use std::time::{Duration, Instant};

use redis::{RedisWrite, ToRedisArgs, ToSingleRedisArg};

use crate::manifest::ManifestId;
use crate::record::{RecordKey, StoreFingerprint};

use super::Shared;

/// The client for `config`'s URL. A `rediss://` one speaks TLS through
/// rustls with ring as its crypto (installed as the process's default
/// provider once; nothing else in kvserve uses rustls), checking the
/// server's certificate against `ca_pem` if given, else the system's roots;
/// there is no way to skip the check.
pub(super) fn client(config: &super::RemoteConfig) -> redis::RedisResult<redis::Client> {
    if config.url.starts_with("rediss://") {
        // ring lacks rustls's post-quantum key exchange (aws-lc-rs has it,
        // at the price of a C toolchain build twice as long); classical
        // ECDHE is what Redis itself offers. Err: a provider is installed
        // already (ours, on a second open).
        #[allow(deprecated)]
        let provider = rustls::crypto::ring::default_provider();
        let _ = provider.install_default();
    }
    match &config.ca_pem {
        Some(pem) => redis::Client::build_with_tls(
            config.url.as_str(),
            redis::TlsCertificates { client_tls: None, root_cert: Some(pem.clone()) },
        ),
        None => redis::Client::open(config.url.as_str()),
    }
}

/// First backoff after a failed connect.
const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Writes a manifest unless the store holds a newer turn. `KEYS[1]`: the
/// manifest key; `ARGV`: turns (decimal), the manifest's bytes, the TTL in
/// ms. Turns compare as decimal strings (exact for any u64). The same turn
/// is written again: a retried commit of a turn names at least as many
/// blocks. Returns 1 if written, 0 if the stored turn is newer.
pub(super) const PUT_MANIFEST: &str = r"
local cur = redis.call('HGET', KEYS[1], 'turns')
if cur and (#cur > #ARGV[1] or (#cur == #ARGV[1] and cur > ARGV[1])) then
  return 0
end
redis.call('HSET', KEYS[1], 'turns', ARGV[1], 'data', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// Deletes a manifest only if it still holds the bytes read (`ARGV[1]`),
/// so a bad manifest's deletion never takes a good one written meanwhile.
pub(super) const DEL_MANIFEST_IF: &str = r"
if redis.call('HGET', KEYS[1], 'data') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// The key of a block record.
pub(super) fn block_key(fp: &str, k: &RecordKey) -> String {
    format!("kvs:{fp}:{{{}}}:g{}", k.hash, k.group)
}

/// The key of an agent's manifest.
pub(super) fn manifest_key(fp: &str, id: &ManifestId) -> String {
    format!("kvs:{fp}:a:{{{}}}", id.hex())
}

/// The hex form of a store fingerprint, as keys use it.
pub(super) fn fp_hex(fp: &StoreFingerprint) -> String {
    fp.hex()
}

/// `url` with any user name and password replaced by `***`, and any query
/// (which may carry credentials too) by `?***`: the only form of the URL
/// that goes into logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Not a URL at all: it may still hold a secret; show no part of it.
        return "<unparsable URL>".into();
    };
    // Hosts and database numbers never hold '@': whatever comes before the
    // last one is credentials, whatever characters they contain.
    let (user, rest) = match rest.rfind('@') {
        Some(at) => ("***@", &rest[at + 1..]),
        None => ("", rest),
    };
    let (rest, query) = match rest.find(['?', '#']) {
        Some(q) => (&rest[..q], "?***"),
        None => (rest, ""),
    };
    format!("{scheme}://{user}{rest}{query}")
}

/// A block record as one Redis argument (header then payload), written
/// straight into the command buffer without joining them first.
pub(super) struct RecordArg<'a> {
    pub(super) header: &'a [u8],
    pub(super) payload: &'a [u8],
}

impl ToRedisArgs for RecordArg<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let mut w = out.writer_for_next_arg();
        // Writing into the command's own Vec cannot fail.
        let _ = w.write_all(self.header);
        let _ = w.write_all(self.payload);
    }
}

impl ToSingleRedisArg for RecordArg<'_> {}

/// A short description of a failed call, for logs, errors and
/// [`crate::Reject::Unreadable`]; it never holds the URL.
pub(super) fn describe(e: &redis::RedisError) -> String {
    if e.is_timeout() {
        format!("timed out ({e})")
    } else {
        e.to_string()
    }
}

/// One thread's connection; see the module doc.
pub(super) struct Conn {
    con: Option<redis::Connection>,
    /// The tier's recovery count when the connection was made: a recovery
    /// since means the store was unreachable meanwhile, so the connection
    /// is likely dead and is made again before use.
    epoch: u64,
    /// Whether this thread was ever connected (a later connect counts as a
    /// reconnect).
    was_connected: bool,
    backoff: Duration,
    /// No connect before this, unless the store came back since `epoch`.
    retry_at: Option<(Instant, u64)>,
    /// Why the last connect failed (repeated while backing off).
    last_error: String,
    /// Whether the manifest script is loaded on the store since this
    /// connection was made (a restarted store forgets scripts, and a
    /// restart always drops the connection).
    scripts_loaded: bool,
}

impl Conn {
    pub(super) fn new() -> Self {
        Self {
            con: None,
            epoch: 0,
            was_connected: false,
            backoff: BACKOFF_MIN,
            retry_at: None,
            last_error: String::new(),
            scripts_loaded: false,
        }
    }

    /// Runs `f` on the thread's connection (made now if there is none, the
    /// manifest script loaded first if `scripts`). A call that fails drops
    /// the connection; if it was an older connection that turned out closed
    /// (the store or something between restarted), `f` runs once more on a
    /// fresh one: every call the tier makes is idempotent.
    ///
    /// # Errors
    /// Why it failed, for logs and rejects.
    pub(super) fn call<T>(
        &mut self,
        shared: &Shared,
        scripts: bool,
        f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, String> {
        let epoch = shared.recoveries();
        if self.con.is_some() && self.epoch != epoch {
            self.con = None;
        }
        let reused = self.con.is_some();
        match self.try_call(shared, epoch, scripts, &f) {
            Err(Failure::Call(e)) if reused && (e.is_connection_dropped() || e.is_connection_refusal()) => {
                self.try_call(shared, epoch, scripts, &f).map_err(Failure::into_reason)
            }
            r => r.map_err(Failure::into_reason),
        }
    }

    fn try_call<T>(
        &mut self,
        shared: &Shared,
        epoch: u64,
        scripts: bool,
        f: &impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, Failure> {
        let fresh = self.connect(shared, epoch).map_err(Failure::Connect)?;
        if fresh {
            self.scripts_loaded = false;
        }
        let con = self.con.as_mut().ok_or_else(|| Failure::Connect("no connection".into()))?;
        let mut result = Ok(());
        if scripts && !self.scripts_loaded {
            result = shared.scripts.put_manifest.load(con).map(drop);
            self.scripts_loaded = result.is_ok();
        }
        match result.and_then(|()| f(con)) {
            Ok(v) => Ok(v),
            Err(e) => {
                self.con = None;
                Err(Failure::Call(e))
            }
        }
    }

    /// Makes the connection if there is none (unless backing off); true if
    /// it made one.
    fn connect(&mut self, shared: &Shared, epoch: u64) -> Result<bool, String> {
        if self.con.is_some() {
            return Ok(false);
        }
        if let Some((at, failed_epoch)) = self.retry_at {
            if Instant::now() < at && epoch == failed_epoch {
                return Err(format!("reconnecting after: {}", self.last_error));
            }
        }
        match connect(shared) {
            Ok(con) => {
                if self.was_connected {
                    shared.state().stats.reconnects += 1;
                }
                self.was_connected = true;
                self.backoff = BACKOFF_MIN;
                self.retry_at = None;
                self.epoch = epoch;
                self.con = Some(con);
                Ok(true)
            }
            Err(e) => {
                let cap = (2 * shared.limits.ping).max(BACKOFF_MIN);
                self.retry_at = Some((Instant::now() + self.backoff, epoch));
                self.backoff = (self.backoff * 2).min(cap);
                self.last_error = format!("cannot connect to {}: {e}", shared.url);
                Err(self.last_error.clone())
            }
        }
    }

    /// The store said it does not have the script (flushed): load it again
    /// before the next use.
    pub(super) fn forget_scripts(&mut self) {
        self.scripts_loaded = false;
    }
}

/// How a call failed.
enum Failure {
    /// No connection could be made.
    Connect(String),
    /// The call failed (the connection was dropped).
    Call(redis::RedisError),
}

impl Failure {
    fn into_reason(self) -> String {
        match self {
            Self::Connect(r) => r,
            Self::Call(e) => describe(&e),
        }
    }
}

/// A new connection with the call timeout set on it.
///
/// # Errors
/// What the connect said.
pub(super) fn connect(shared: &Shared) -> Result<redis::Connection, String> {
    let con = shared.client.get_connection_with_timeout(shared.limits.connect_timeout).map_err(|e| describe(&e))?;
    con.set_read_timeout(Some(shared.limits.timeout)).map_err(|e| describe(&e))?;
    con.set_write_timeout(Some(shared.limits.timeout)).map_err(|e| describe(&e))?;
    Ok(con)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv::BlockHash;

    #[test]
    fn a_password_never_shows_in_a_redacted_url() {
        assert_eq!(redact_url("redis://user:s3cret@host:6379/2"), "redis://***@host:6379/2");
        assert_eq!(redact_url("redis://:s3cret@host"), "redis://***@host");
        assert_eq!(redact_url("redis://h:1/0?password=x"), "redis://h:1/0?***");
        assert_eq!(redact_url("redis://a@b:p@ss@host/1"), "redis://***@host/1");
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact_url("redis://:pa/ss?x#@host/3"), "redis://***@host/3");
        assert_eq!(redact_url("s3cret"), "<unparsable URL>");
    }

    #[test]
    fn keys_are_hashes_with_the_address_as_hash_tag() {
        let fp = "00112233445566778899aabbccddeeff";
        let k = RecordKey::new(1, BlockHash::from_u128(0xab));
        assert_eq!(block_key(fp, &k), format!("kvs:{fp}:{{{:032x}}}:g1", 0xab));
        let id = ManifestId::of("t", "a");
        assert_eq!(manifest_key(fp, &id), format!("kvs:{fp}:a:{{{}}}", id.hex()));
    }
}
