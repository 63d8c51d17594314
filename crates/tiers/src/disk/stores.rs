//! What a cache directory holds, for people (`kvserve cache`): each store
//! (one per model and cache layout, named by its fingerprint), its size,
//! the model it belongs to, its agents; and clearing a store or one agent.
//!
//! # Design
//!
//! Read-only listing needs no lock: it reads names, sizes and manifests
//! (a manifest being replaced meanwhile is either the old or the new one,
//! both whole). Clearing takes the store's `LOCK` as [`DiskTier::open`]
//! does, so it is refused while a server uses the store ([`Error::Locked`];
//! a running server deletes agents through its API instead). Clearing an
//! agent removes its manifest, then the records it names that no other
//! manifest names, the same rule the writer applies; the directory is
//! synced after each step. A store's `MODEL` file (written at open from
//! [`DiskConfig::label`]) says which model it is: the fingerprint alone
//! does not.
//!
//! [`DiskTier::open`]: super::DiskTier::open
//! [`DiskConfig::label`]: super::DiskConfig::label

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::io_err;
use crate::error::{Error, Result};
use crate::fs::{Fs, StdFs};
use crate::manifest::{AgentManifest, ManifestId};
use crate::record::{RecordKey, StoreFingerprint};

/// The file naming a store's model.
pub const LABEL_FILE: &str = "MODEL";

/// One store in a cache directory.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreInfo {
    /// Its directory.
    pub dir: PathBuf,
    /// What its `MODEL` file says (empty if it has none).
    pub label: String,
    /// Block records.
    pub records: usize,
    /// Bytes of everything in it.
    pub bytes: u64,
    /// Its agents, most recently used first.
    pub agents: Vec<AgentManifest>,
    /// Whether a server holds it now.
    pub in_use: bool,
}

/// Every store under `root` (none if `root` does not exist).
///
/// # Errors
/// [`Error::Io`] if a directory cannot be read.
pub fn list(root: &Path) -> Result<Vec<StoreInfo>> {
    let fs = StdFs;
    let Ok(entries) = std::fs::read_dir(root) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for e in entries {
        let name = e.map_err(io_err(root))?.file_name().to_string_lossy().into_owned();
        let Some(fp) = fingerprint_of(&name) else { continue };
        let dir = root.join(&name);
        if !dir.join("blocks").is_dir() {
            continue;
        }
        let (mut records, mut bytes) = (0, 0);
        for item in fs.list(&dir.join("blocks")).unwrap_or_default() {
            records += usize::from(RecordKey::from_file_name(&item.name).is_some());
            bytes += item.len;
        }
        let mut agents = Vec::new();
        for item in fs.list(&dir.join("agents")).unwrap_or_default() {
            bytes += item.len;
            if ManifestId::from_file_name(&item.name).is_none() {
                continue;
            }
            if let Ok(m) = fs.read(&dir.join("agents").join(&item.name)).map(|b| AgentManifest::decode(&b, &fp)) {
                agents.extend(m.ok());
            }
        }
        agents.sort_by_key(|a| std::cmp::Reverse(a.last_used_unix_ms));
        let label = std::fs::read_to_string(dir.join(LABEL_FILE)).unwrap_or_default().trim().to_owned();
        let in_use = matches!(super::take_lock(&fs, &dir), Err(Error::Locked { .. }));
        out.push(StoreInfo { dir, label, records, bytes, agents, in_use });
    }
    out.sort_by(|a, b| a.dir.cmp(&b.dir));
    Ok(out)
}

/// Deletes a whole store; returns the bytes it held.
///
/// # Errors
/// [`Error::Locked`] while a server uses it; [`Error::Config`] for a
/// directory that is not a store; [`Error::Io`].
pub fn clear_store(dir: &Path) -> Result<u64> {
    let _lock = lock(dir)?;
    let bytes: u64 =
        ["blocks", "agents"].iter().flat_map(|d| StdFs.list(&dir.join(d)).unwrap_or_default()).map(|i| i.len).sum();
    // Manifests first: a store cut short by a crash has blocks but no
    // agents, which the next open treats as plain cached blocks.
    for sub in ["agents", "blocks"] {
        let d = dir.join(sub);
        if d.exists() {
            std::fs::remove_dir_all(&d).map_err(io_err(&d))?;
        }
    }
    std::fs::remove_dir_all(dir).map_err(io_err(dir))?;
    Ok(bytes)
}

/// Deletes `tenant`'s agent `agent` from the store in `dir`: its manifest
/// and the records no other agent names. Returns the records deleted, or
/// `None` if the store has no such agent.
///
/// # Errors
/// As [`clear_store`].
pub fn clear_agent(dir: &Path, tenant: &str, agent: &str) -> Result<Option<usize>> {
    let _lock = lock(dir)?;
    let fp = dir.file_name().and_then(|n| fingerprint_of(&n.to_string_lossy())).ok_or_else(|| not_a_store(dir))?;
    let (agents_dir, blocks_dir) = (dir.join("agents"), dir.join("blocks"));
    let target = ManifestId::of(tenant, agent);
    let mut theirs = None;
    let mut others = HashSet::new();
    for item in StdFs.list(&agents_dir).map_err(io_err(&agents_dir))? {
        let Some(id) = ManifestId::from_file_name(&item.name) else { continue };
        let Ok(Ok(m)) = StdFs.read(&agents_dir.join(&item.name)).map(|b| AgentManifest::decode(&b, &fp)) else {
            continue;
        };
        if id == target {
            theirs = Some(m);
        } else {
            others.extend(m.records());
        }
    }
    let Some(m) = theirs else { return Ok(None) };
    let path = agents_dir.join(target.file_name());
    std::fs::remove_file(&path).map_err(io_err(&path))?;
    StdFs.sync_dir(&agents_dir).map_err(io_err(&agents_dir))?;
    let mut deleted = 0;
    for k in m.records().filter(|k| !others.contains(k)) {
        deleted += usize::from(std::fs::remove_file(blocks_dir.join(k.file_name())).is_ok());
    }
    StdFs.sync_dir(&blocks_dir).map_err(io_err(&blocks_dir))?;
    Ok(Some(deleted))
}

/// The store's lock, as a server takes it.
fn lock(dir: &Path) -> Result<Box<dyn crate::fs::LockGuard>> {
    if !dir.join("blocks").is_dir() {
        return Err(not_a_store(dir));
    }
    super::take_lock(&StdFs, dir)
}

/// The fingerprint a store directory is named by.
fn fingerprint_of(name: &str) -> Option<StoreFingerprint> {
    if name.len() != 32 {
        return None;
    }
    let n = u128::from_str_radix(name, 16).ok()?;
    let fp = StoreFingerprint::from_bytes(n.to_be_bytes());
    (fp.hex() == name).then_some(fp)
}

fn not_a_store(dir: &Path) -> Error {
    Error::Config(format!("{} is not a kvserve KV store", dir.display()))
}
