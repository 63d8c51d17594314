//! Opening a GGUF file: memory-mapped, validated before anything is trusted.
//!
//! The header is parsed by candle's `gguf_file` (which bounds-checks every
//! length against the file size) over a read-only memory map, so opening a
//! file costs no copy; tensors are materialised one at a time when the model
//! is built. Failures become typed errors that name the file: missing,
//! not a GGUF (magic), truncated (header or any tensor past the end),
//! unsupported tensor types.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use memmap2::Mmap;

use crate::error::{Error, Result};

/// An open, validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    content: Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .field("metadata", &self.content.metadata.len())
            .finish_non_exhaustive()
    }
}

/// Tensor types the runtime can multiply with (candle has kernels for all).
const SUPPORTED: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

impl GgufFile {
    /// Opens and validates `path`.
    ///
    /// # Errors
    /// [`Error::Open`], [`Error::NotGguf`], [`Error::Corrupt`] or
    /// [`Error::UnsupportedTensorType`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|source| Error::Open { path: path.clone(), source })?;
        let meta = file.metadata().map_err(|source| Error::Open { path: path.clone(), source })?;
        if !meta.is_file() {
            let source = std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file");
            return Err(Error::Open { path, source });
        }
        #[allow(unsafe_code)] // mmap is the point: the issue asks for a memory-mapped GGUF
        // SAFETY: the map is read-only and private to this process. A file
        // truncated or rewritten underneath by another process is outside
        // what any mmap user can prevent; every read below is bounds-checked
        // against the length taken at mapping time.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Open { path: path.clone(), source })?;
        if mmap.len() < 4 || &mmap[..4] != b"GGUF" {
            return Err(Error::NotGguf { path, magic: mmap[..mmap.len().min(4)].to_vec() });
        }
        let content = Content::read(&mut Cursor::new(&mmap[..])).map_err(|e| classify(&path, e.to_string()))?;
        let file = Self { path, mmap, content };
        file.validate_tensors()?;
        Ok(file)
    }

    fn validate_tensors(&self) -> Result<()> {
        let len = self.mmap.len() as u64;
        for (name, info) in &self.content.tensor_infos {
            if !SUPPORTED.contains(&info.ggml_dtype) {
                return Err(Error::UnsupportedTensorType {
                    path: self.path.clone(),
                    tensor: name.clone(),
                    dtype: format!("{:?}", info.ggml_dtype),
                });
            }
            let elems = info.shape.elem_count();
            let bs = info.ggml_dtype.block_size();
            if elems % bs != 0 {
                return Err(self.corrupt(format!("tensor {name} has {elems} elements, not a multiple of {bs}")));
            }
            let bytes = (elems / bs * info.ggml_dtype.type_size()) as u64;
            let end = self.content.tensor_data_offset.saturating_add(info.offset).saturating_add(bytes);
            if end > len {
                return Err(self.corrupt(format!("tensor {name} ends at byte {end} but the file has {len}")));
            }
        }
        Ok(())
    }

    fn corrupt(&self, detail: String) -> Error {
        Error::Corrupt { path: self.path.clone(), detail }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every byte of the file (the memory map).
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// The file's size in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// All metadata.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// Whether a tensor exists.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Shape of a tensor (candle order: outermost first).
    pub fn tensor_shape(&self, name: &str) -> Option<&[usize]> {
        self.content.tensor_infos.get(name).map(|i| i.shape.dims())
    }

    /// Loads one tensor.
    ///
    /// # Errors
    /// [`Error::Tensor`] if absent or unreadable.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(Error::Tensor { path: self.path.clone(), tensor: name.into(), problem: "missing".into() });
        }
        self.content.tensor(&mut Cursor::new(&self.mmap[..]), name, device).map_err(|e| Error::Tensor {
            path: self.path.clone(),
            tensor: name.into(),
            problem: e.to_string(),
        })
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.content.metadata.get(key).ok_or_else(|| self.meta_err(key, "missing"))
    }

    pub(crate) fn meta_err(&self, key: &str, problem: impl Into<String>) -> Error {
        Error::Metadata { path: self.path.clone(), key: key.into(), problem: problem.into() }
    }

    /// A string value.
    ///
    /// # Errors
    /// [`Error::Metadata`] if missing or not a string.
    pub fn string(&self, key: &str) -> Result<&str> {
        self.get(key)?.to_string().map(String::as_str).map_err(|_| self.meta_err(key, "not a string"))
    }

    /// An unsigned integer value (any integer width, non-negative).
    ///
    /// # Errors
    /// [`Error::Metadata`] if missing or not such a number.
    pub fn uint(&self, key: &str) -> Result<u64> {
        let v = self.get(key)?;
        let n = match v {
            Value::U8(x) => u64::from(*x),
            Value::U16(x) => u64::from(*x),
            Value::U32(x) => u64::from(*x),
            Value::U64(x) => *x,
            Value::I8(x) => u64::try_from(*x).map_err(|_| self.meta_err(key, "negative"))?,
            Value::I16(x) => u64::try_from(*x).map_err(|_| self.meta_err(key, "negative"))?,
            Value::I32(x) => u64::try_from(*x).map_err(|_| self.meta_err(key, "negative"))?,
            Value::I64(x) => u64::try_from(*x).map_err(|_| self.meta_err(key, "negative"))?,
            _ => return Err(self.meta_err(key, "not an integer")),
        };
        Ok(n)
    }

    /// A float value (integers accepted).
    ///
    /// # Errors
    /// [`Error::Metadata`] if missing or not a number.
    pub fn float(&self, key: &str) -> Result<f64> {
        match self.get(key)? {
            Value::F32(x) => Ok(f64::from(*x)),
            Value::F64(x) => Ok(*x),
            _ => self.uint(key).map(|n| n as f64),
        }
    }

    /// An array value.
    ///
    /// # Errors
    /// [`Error::Metadata`] if missing or not an array.
    pub fn array(&self, key: &str) -> Result<&[Value]> {
        self.get(key)?.to_vec().map(Vec::as_slice).map_err(|_| self.meta_err(key, "not an array"))
    }

    /// Whether a metadata key exists.
    pub fn has(&self, key: &str) -> bool {
        self.content.metadata.contains_key(key)
    }
}

/// Sorts candle's header errors into ours.
fn classify(path: &Path, msg: String) -> Error {
    let path = path.to_path_buf();
    if let Some(rest) = msg.strip_prefix("unknown dtype for tensor ") {
        return Error::UnsupportedTensorType { path, tensor: "(header)".into(), dtype: format!("ggml type {rest}") };
    }
    Error::Corrupt { path, detail: msg }
}
