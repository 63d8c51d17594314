//! Identifier newtypes. No bare integer crosses a module boundary as an id.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A token id as the tokenizer produces it. Tokens are data, stored in bulk
/// (`&[TokenId]`), so this is an alias rather than a newtype.
pub type TokenId = u32;

/// One block of the pool: an index into the model's K/V arenas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockId(u32);

impl BlockId {
    /// The block with this index.
    pub const fn new(index: u32) -> Self {
        Self(index)
    }

    /// The index into per-block arenas.
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// The raw number.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b{}", self.0)
    }
}

/// A sequence (one request's or one agent's token stream) in the cache.
/// Never reused within one cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SeqId(u64);

impl SeqId {
    pub(crate) const fn new(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// Who blocks are charged to: an agent or a tenant. Validated on
/// construction because these names come from clients: 1 to 128 characters of
/// ASCII letters, digits, `-`, `_`, `.`, `:` and `@`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OwnerId(Arc<str>);

impl OwnerId {
    /// The longest accepted id, in bytes.
    pub const MAX_LEN: usize = 128;

    /// Validates and wraps an owner name.
    ///
    /// # Errors
    /// [`Error::InvalidOwnerId`] if the name is empty, too long, or has a
    /// character outside the allowed set.
    pub fn new(id: impl AsRef<str>) -> Result<Self> {
        let id = id.as_ref();
        let reject = |reason| Error::InvalidOwnerId { id: id.chars().take(64).collect(), reason };
        if id.is_empty() {
            return Err(reject("empty"));
        }
        if id.len() > Self::MAX_LEN {
            return Err(reject("longer than 128 bytes"));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@');
        if !id.chars().all(allowed) {
            return Err(reject("only ASCII letters, digits and - _ . : @ are allowed"));
        }
        Ok(Self(Arc::from(id)))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for OwnerId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

impl TryFrom<String> for OwnerId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::new(s)
    }
}

impl From<OwnerId> for String {
    fn from(id: OwnerId) -> Self {
        id.0.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_ids_are_validated() {
        assert!(OwnerId::new("agent-7").is_ok());
        assert!(OwnerId::new("tenant:acme@eu.1_x").is_ok());
        for bad in ["", "a b", "../etc/passwd", "x\0y", "é"] {
            assert!(matches!(OwnerId::new(bad), Err(Error::InvalidOwnerId { .. })), "{bad:?}");
        }
        assert!(OwnerId::new("a".repeat(128)).is_ok());
        assert!(OwnerId::new("a".repeat(129)).is_err());
    }
}
