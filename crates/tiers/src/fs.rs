//! The file operations the disk tier uses, behind a small trait.
//!
//! [`StdFs`] is the real thing. [`MemFs`] keeps files in memory behind the
//! crate's `sync` lock, so the loom models explore the disk tier's real
//! protocol (index updates, renames and unlinks under one lock) without a
//! file system. Tests wrap [`StdFs`] to inject faults into real files:
//! `ENOSPC` on the nth write, or a `SIGKILL` of the process at a chosen point
//! of the write protocol (after a temporary file, in the middle of a
//! manifest, before a rename or a directory sync).
//!
//! Every operation is one step of the protocol, so a fault can be placed
//! between any two of them: `write_new` creates a file that must not exist
//! and writes it whole (no sync); `sync_batch` makes a set of written files
//! and directory entries durable; `rename` replaces atomically.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::sync::Mutex;

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirItem {
    /// The file name (not the path).
    pub name: String,
    /// Its size in bytes.
    pub len: u64,
    /// Its last modification.
    pub modified: SystemTime,
}

/// A held lock on a directory; released when dropped (or when the process
/// dies: the kernel drops advisory locks with their last descriptor).
pub trait LockGuard: Send + Sync + fmt::Debug {}

/// The file operations of the disk tier. Paths are built by the tier from
/// hashes; implementations need not validate them.
pub trait Fs: Send + Sync + fmt::Debug + 'static {
    /// Creates `dir` and its parents (0700 where created).
    ///
    /// # Errors
    /// What the system says.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Creates `path`, which must not exist (0600), and writes `parts` to it
    /// in order. Nothing is synced.
    ///
    /// # Errors
    /// What the system says; a partial file may be left behind.
    fn write_new(&self, path: &Path, parts: &[&[u8]]) -> io::Result<()>;
    /// The whole file.
    ///
    /// # Errors
    /// What the system says (`NotFound` for a missing file).
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// A block record, expected to be `len` bytes (a multiple of 4096),
    /// read past the page cache where the system allows it (a record read
    /// back goes straight into the pool; caching its pages would only
    /// evict something else). By default, [`Fs::read`].
    ///
    /// # Errors
    /// What the system says.
    fn read_record(&self, path: &Path, len: usize) -> io::Result<crate::record::ReadBuf> {
        let _ = len;
        let buf = self.read(path)?;
        Ok(crate::record::ReadBuf { len: buf.len(), buf, at: 0 })
    }
    /// Replaces `to` with `from` atomically.
    ///
    /// # Errors
    /// What the system says.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    ///
    /// # Errors
    /// What the system says (`NotFound` if it is not there).
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// The regular files in `dir`.
    ///
    /// # Errors
    /// What the system says.
    fn list(&self, dir: &Path) -> io::Result<Vec<DirItem>>;
    /// Makes the data of `files` and the entries of `dirs` durable.
    ///
    /// # Errors
    /// What the system says.
    fn sync_batch(&self, files: &[PathBuf], dirs: &[PathBuf]) -> io::Result<()>;
    /// Makes the entries of `dir` (renames into it) durable.
    ///
    /// # Errors
    /// What the system says.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes an exclusive advisory lock on the file `path` (created if
    /// missing), without waiting.
    ///
    /// # Errors
    /// `WouldBlock` if another holder has it; otherwise what the system says.
    fn lock(&self, path: &Path) -> io::Result<Box<dyn LockGuard>>;
    /// Drops the file's pages from the page cache, if the system can (after
    /// a write is durable, or before a benchmark's cold read).
    fn forget_cached(&self, path: &Path);
}

/// Real files.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFs;

#[derive(Debug)]
struct FileLock(#[allow(dead_code)] std::fs::File); // held for its lock, never read

impl LockGuard for FileLock {}

impl Fs for StdFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        b.create(dir)
    }

    fn write_new(&self, path: &Path, parts: &[&[u8]]) -> io::Result<()> {
        use std::io::Write;
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let mut f = o.open(path)?;
        for p in parts {
            f.write_all(p)?;
        }
        Ok(())
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn read_record(&self, path: &Path, len: usize) -> io::Result<crate::record::ReadBuf> {
        #[cfg(target_os = "linux")]
        if len.is_multiple_of(PAGE) {
            match read_direct(path, len) {
                Ok(r) => return Ok(r),
                // Not supported here (tmpfs, some network file systems):
                // an ordinary read.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        let buf = std::fs::read(path)?;
        Ok(crate::record::ReadBuf { len: buf.len(), buf, at: 0 })
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<DirItem>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let Ok(name) = entry.file_name().into_string() else { continue };
            out.push(DirItem { name, len: meta.len(), modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH) });
        }
        Ok(out)
    }

    fn sync_batch(&self, files: &[PathBuf], dirs: &[PathBuf]) -> io::Result<()> {
        if files.is_empty() && dirs.is_empty() {
            return Ok(());
        }
        // One syncfs flushes every dirty page and metadata change of the
        // file system: one device flush for the whole batch, where an
        // fdatasync per file costs one each.
        #[cfg(target_os = "linux")]
        if let Some(any) = dirs.first().or(files.first()) {
            return syncfs(any);
        }
        for f in files {
            match std::fs::File::open(f) {
                Ok(file) => file.sync_data()?,
                // Unlinked in the same batch (evicted, or a cancelled
                // commit's): nothing to make durable.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        for d in dirs {
            self.sync_dir(d)?;
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn LockGuard>> {
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let f = o.open(path)?;
        match f.try_lock() {
            Ok(()) => Ok(Box::new(FileLock(f))),
            Err(std::fs::TryLockError::WouldBlock) => Err(io::ErrorKind::WouldBlock.into()),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    fn forget_cached(&self, path: &Path) {
        #[cfg(target_os = "linux")]
        if let Ok(f) = std::fs::File::open(path) {
            use std::os::fd::AsRawFd;
            #[allow(unsafe_code)] // posix_fadvise has no safe wrapper in std
            // SAFETY: `f` is an open descriptor for the whole call; the
            // advice only drops clean cached pages, it never touches memory
            // of this process.
            unsafe {
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = path;
    }
}

/// Direct I/O alignment.
const PAGE: usize = 4096;

/// Reads up to `len` bytes of `path` with `O_DIRECT` into a page-aligned
/// part of a buffer (no `unsafe`: the buffer is over-allocated by a page
/// and the aligned window is used). A shorter file gives a shorter record,
/// which the caller rejects as truncated.
#[cfg(target_os = "linux")]
fn read_direct(path: &Path, len: usize) -> io::Result<crate::record::ReadBuf> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path)?;
    // One page more than the record, so one more read sees the end of a
    // file longer than expected.
    let want = len + PAGE;
    let mut buf = vec![0u8; want + PAGE];
    let at = buf.as_ptr().align_offset(PAGE).min(PAGE);
    let mut got = 0;
    while got < want {
        match f.read(&mut buf[at + got..at + want]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(crate::record::ReadBuf { buf, at, len: got })
}

#[cfg(target_os = "linux")]
fn syncfs(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    #[allow(unsafe_code)] // syncfs has no safe wrapper in std
    // SAFETY: `f` is an open descriptor for the whole call; syncfs reads no
    // memory of this process.
    let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A hook on writes: `Some(result)` is returned instead of writing,
/// `None` lets the write happen.
pub type WriteHook = Box<dyn Fn(&Path, &[&[u8]]) -> Option<io::Result<()>> + Send + Sync>;
/// A hook on an operation on one path (read, directory sync).
pub type PathHook = Box<dyn Fn(&Path) -> Option<io::Result<()>> + Send + Sync>;
/// A hook on renames: `(from, to)`.
pub type RenameHook = Box<dyn Fn(&Path, &Path) -> Option<io::Result<()>> + Send + Sync>;
/// A hook on batch syncs.
pub type SyncHook = Box<dyn Fn() -> Option<io::Result<()>> + Send + Sync>;

/// Real files ([`StdFs`]) with hooks on the operations tests fault: a full
/// disk (a write hook returning `ENOSPC`), a slow one (a hook that sleeps
/// and returns `None`), a crash point (a hook that does the operation, or
/// half of it, then kills the process). Operations without a hook are
/// [`StdFs`]'s.
#[derive(Default)]
pub struct HookedFs {
    write: Option<WriteHook>,
    read: Option<PathHook>,
    rename: Option<RenameHook>,
    sync_batch: Option<SyncHook>,
    sync_dir: Option<PathHook>,
}

impl fmt::Debug for HookedFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookedFs").finish_non_exhaustive()
    }
}

impl HookedFs {
    /// Real files, no hook yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Hooks `write_new`.
    #[must_use]
    pub fn on_write(mut self, f: impl Fn(&Path, &[&[u8]]) -> Option<io::Result<()>> + Send + Sync + 'static) -> Self {
        self.write = Some(Box::new(f));
        self
    }

    /// Hooks `read` and `read_record` (an error from the hook fails the
    /// read; `Some(Ok(()))` and `None` both let it happen).
    #[must_use]
    pub fn on_read(mut self, f: impl Fn(&Path) -> Option<io::Result<()>> + Send + Sync + 'static) -> Self {
        self.read = Some(Box::new(f));
        self
    }

    /// Hooks `rename`.
    #[must_use]
    pub fn on_rename(mut self, f: impl Fn(&Path, &Path) -> Option<io::Result<()>> + Send + Sync + 'static) -> Self {
        self.rename = Some(Box::new(f));
        self
    }

    /// Hooks `sync_batch`.
    #[must_use]
    pub fn on_sync_batch(mut self, f: impl Fn() -> Option<io::Result<()>> + Send + Sync + 'static) -> Self {
        self.sync_batch = Some(Box::new(f));
        self
    }

    /// Hooks `sync_dir`.
    #[must_use]
    pub fn on_sync_dir(mut self, f: impl Fn(&Path) -> Option<io::Result<()>> + Send + Sync + 'static) -> Self {
        self.sync_dir = Some(Box::new(f));
        self
    }

    fn read_hook(&self, path: &Path) -> io::Result<()> {
        match self.read.as_ref().and_then(|h| h(path)) {
            Some(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }
}

impl Fs for HookedFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        StdFs.create_dir_all(dir)
    }

    fn write_new(&self, path: &Path, parts: &[&[u8]]) -> io::Result<()> {
        self.write.as_ref().and_then(|h| h(path, parts)).unwrap_or_else(|| StdFs.write_new(path, parts))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.read_hook(path)?;
        StdFs.read(path)
    }

    fn read_record(&self, path: &Path, len: usize) -> io::Result<crate::record::ReadBuf> {
        self.read_hook(path)?;
        StdFs.read_record(path, len)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.rename.as_ref().and_then(|h| h(from, to)).unwrap_or_else(|| StdFs.rename(from, to))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        StdFs.remove_file(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<DirItem>> {
        StdFs.list(dir)
    }

    fn sync_batch(&self, files: &[PathBuf], dirs: &[PathBuf]) -> io::Result<()> {
        self.sync_batch.as_ref().and_then(|h| h()).unwrap_or_else(|| StdFs.sync_batch(files, dirs))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.sync_dir.as_ref().and_then(|h| h(dir)).unwrap_or_else(|| StdFs.sync_dir(dir))
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn LockGuard>> {
        StdFs.lock(path)
    }

    fn forget_cached(&self, path: &Path) {
        StdFs.forget_cached(path);
    }
}

/// Files in memory, for the loom models and quick tests: every operation is
/// atomic under one lock (the crate's `sync::Mutex`, loom's under `--cfg
/// loom`), reads return a snapshot, syncs do nothing.
#[derive(Debug, Default)]
pub struct MemFs {
    files: Mutex<BTreeMap<PathBuf, Vec<u8>>>,
}

impl MemFs {
    /// An empty file system.
    pub fn new() -> Self {
        Self::default()
    }

    fn files(&self) -> io::Result<crate::sync::MutexGuard<'_, BTreeMap<PathBuf, Vec<u8>>>> {
        self.files.lock().map_err(|_| io::Error::other("poisoned"))
    }

    /// Whether `path` exists.
    pub fn exists(&self, path: &Path) -> bool {
        self.files().is_ok_and(|f| f.contains_key(path))
    }

    /// Every file path, in order.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.files().map(|f| f.keys().cloned().collect()).unwrap_or_default()
    }
}

#[derive(Debug)]
struct NoLock;

impl LockGuard for NoLock {}

impl Fs for MemFs {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn write_new(&self, path: &Path, parts: &[&[u8]]) -> io::Result<()> {
        let mut files = self.files()?;
        if files.contains_key(path) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        files.insert(path.to_path_buf(), parts.concat());
        Ok(())
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.files()?.get(path).cloned().ok_or_else(|| io::ErrorKind::NotFound.into())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut files = self.files()?;
        let data = files.remove(from).ok_or(io::ErrorKind::NotFound)?;
        files.insert(to.to_path_buf(), data);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.files()?.remove(path).map(drop).ok_or_else(|| io::ErrorKind::NotFound.into())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<DirItem>> {
        Ok(self
            .files()?
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .filter_map(|(p, d)| {
                let name = p.file_name()?.to_str()?.to_owned();
                Some(DirItem { name, len: d.len() as u64, modified: SystemTime::UNIX_EPOCH })
            })
            .collect())
    }

    fn sync_batch(&self, _files: &[PathBuf], _dirs: &[PathBuf]) -> io::Result<()> {
        Ok(())
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn lock(&self, _path: &Path) -> io::Result<Box<dyn LockGuard>> {
        Ok(Box::new(NoLock))
    }

    fn forget_cached(&self, _path: &Path) {}
}
