//! The remote tier's settings, and the checks [`RemoteTier::open`](super::RemoteTier::open) makes of
//! them. The URL may carry a password: `Debug` shows it redacted.

use std::time::Duration;

use super::redact_url;
use crate::error::{Error, Result};

/// How the remote tier is set up.
#[derive(Clone)]
pub struct RemoteConfig {
    /// `redis://[user:pass@]host:port[/db]`, `rediss://` for TLS (the
    /// server's certificate checked against the system's roots, or
    /// [`RemoteConfig::ca_pem`]), or `redis+unix://`, `unix://`.
    pub url: String,
    /// Certificates (PEM) a `rediss://` server's certificate must chain to,
    /// instead of the system's roots: a private CA.
    pub ca_pem: Option<Vec<u8>>,
    /// How long the store keeps a block or manifest after it was last
    /// written or read.
    pub ttl: Duration,
    /// Limit of each socket read or write of a call.
    pub timeout: Duration,
    /// Limit of making a connection.
    pub connect_timeout: Duration,
    /// Reader threads.
    pub readers: usize,
    /// Bytes of payload the write queue holds before it refuses demotions
    /// (and defers commits).
    pub queue_bytes: u64,
    /// Health check interval.
    pub ping: Duration,
    /// How long a miss is remembered ([`Tier::holds`](crate::Tier::holds) answers false).
    pub negative_ttl: Duration,
    /// Whether blocks evicted from the local tiers are written too, not
    /// only agents' turns.
    pub take_evictions: bool,
}

impl std::fmt::Debug for RemoteConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteConfig")
            .field("url", &redact_url(&self.url))
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .field("ttl", &self.ttl)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("readers", &self.readers)
            .field("queue_bytes", &self.queue_bytes)
            .field("ping", &self.ping)
            .field("negative_ttl", &self.negative_ttl)
            .field("take_evictions", &self.take_evictions)
            .finish()
    }
}

impl RemoteConfig {
    /// The store at `url`; blocks kept 24 h after their last use, 500 ms
    /// to connect and 1 s per call, two readers (reads are pipelined),
    /// 256 MiB of queue, a ping every second, misses remembered 2 s,
    /// agents' turns written (not evictions).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_pem: None,
            ttl: Duration::from_secs(24 * 3600),
            timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_millis(500),
            readers: 2,
            queue_bytes: 256 << 20,
            ping: Duration::from_secs(1),
            negative_ttl: Duration::from_secs(2),
            take_evictions: false,
        }
    }

    pub(super) fn validate(&self) -> Result<()> {
        let bad = if self.ttl < Duration::from_millis(1) {
            Some("the remote TTL must be at least 1 ms")
        } else if self.timeout.is_zero() || self.connect_timeout.is_zero() {
            Some("the remote timeouts must be positive")
        } else if self.ping.is_zero() {
            Some("the remote ping interval must be positive")
        } else if self.queue_bytes == 0 {
            Some("the remote write queue needs a size")
        } else if self.readers == 0 {
            Some("the remote tier needs at least one reader")
        } else if self.ca_pem.is_some() && !self.url.starts_with("rediss://") {
            Some("a CA certificate for the remote store needs a rediss:// URL")
        } else {
            None
        };
        bad.map_or(Ok(()), |m| Err(Error::Config(m.into())))
    }
}
