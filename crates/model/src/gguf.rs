//! Opening a GGUF file: memory-mapped, validated before anything is trusted.
//!
//! The header is parsed by candle's `gguf_file` (which bounds-checks every
//! length against the file size) over a read-only memory map, so opening a
//! file costs no copy; tensors are materialised one at a time when the model
//! is built. Failures become typed errors that name the file: missing,
//! not a GGUF (magic), truncated (header or any tensor past the end),
//! unsupported tensor types.
//!
//! What candle does not check is checked around it, since a model file may
//! come from anyone:
//!
//! * before it parses, `prescan` walks the metadata and refuses a
//!   `general.alignment` that is zero (candle divides by it), not a power of
//!   two, or not an integer, naming the field;
//! * after, every tensor's shape is multiplied out with checked arithmetic
//!   (dims like `[2^59, 32]` would wrap to zero elements in a release build
//!   and pass a bounds check), each dimension (at least 1: candle casts an
//!   empty buffer's dangling pointer to the element type) and the element
//!   count are capped, and its byte count and end offset are computed checked against
//!   the file's length.
//!
//! Vocabulary sizes are checked where they are used (the tokenizer and the
//! config refuse more entries than `u32` ids can name).

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
        prescan(&mmap).map_err(|(key, problem)| match key {
            Some(key) => Error::Metadata { path: path.clone(), key, problem },
            None => Error::Corrupt { path: path.clone(), detail: problem },
        })?;
        // The pre-scan covers what is known to panic in candle's parser; a
        // panic nobody knows of yet is still a typed error, not a crash.
        let parsed = std::panic::catch_unwind(|| Content::read(&mut Cursor::new(&mmap[..])));
        let content = match parsed {
            Ok(Ok(content)) => content,
            Ok(Err(e)) => return Err(classify(&path, e.to_string())),
            Err(_) => return Err(Error::Corrupt { path, detail: "the GGUF header made the parser panic".into() }),
        };
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
            let dims = info.shape.dims();
            // An empty tensor is no weight, and candle would cast the empty
            // buffer's dangling pointer to the element type (misaligned).
            if let Some(d) = dims.iter().find(|&&d| d == 0 || d as u64 > MAX_DIM) {
                return Err(self.corrupt(format!("tensor {name} has a dimension of {d} (1 to {MAX_DIM})")));
            }
            let elems = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
                .filter(|&e| e <= MAX_ELEMENTS)
                .ok_or_else(|| self.corrupt(format!("tensor {name} has shape {dims:?}: too many elements")))?;
            let bs = info.ggml_dtype.block_size() as u64;
            if elems % bs != 0 {
                return Err(self.corrupt(format!("tensor {name} has {elems} elements, not a multiple of {bs}")));
            }
            let end = (elems / bs)
                .checked_mul(info.ggml_dtype.type_size() as u64)
                .and_then(|bytes| self.content.tensor_data_offset.checked_add(info.offset)?.checked_add(bytes));
            match end {
                Some(end) if end <= len => {}
                Some(end) => {
                    return Err(self.corrupt(format!("tensor {name} ends at byte {end} but the file has {len}")))
                }
                None => return Err(self.corrupt(format!("tensor {name}'s offset and size overflow"))),
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

    /// Where the tensor data begins: the header (metadata and tensor table,
    /// padded to the alignment) is the bytes before it.
    pub fn data_offset(&self) -> u64 {
        self.content.tensor_data_offset
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

    /// A boolean value.
    ///
    /// # Errors
    /// [`Error::Metadata`] if missing or not a boolean.
    pub fn bool(&self, key: &str) -> Result<bool> {
        match self.get(key)? {
            Value::Bool(b) => Ok(*b),
            _ => Err(self.meta_err(key, "not a boolean")),
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

/// Largest tensor dimension accepted (llama.cpp's largest real ones are
/// vocabularies of a few hundred thousand).
const MAX_DIM: u64 = 1 << 32;
/// Most elements of one tensor (2^40: a terabyte of 8-bit weights).
const MAX_ELEMENTS: u64 = 1 << 40;
/// Largest `general.alignment` accepted.
const MAX_ALIGNMENT: u64 = 1 << 16;

/// Walks a GGUF header's metadata without allocating, for what candle's
/// parser would panic on (see the module doc). It reads the structure as
/// candle does (keys lose trailing NULs, a repeated key's last value wins,
/// values nest at most 64 deep) and judges every `general.alignment` it
/// meets. It is at least as lenient as candle: where it cannot parse, candle
/// fails too (with a proper error) before it uses the alignment.
///
/// # Errors
/// `(Some(key), problem)` for a bad field.
fn prescan(bytes: &[u8]) -> std::result::Result<(), (Option<String>, String)> {
    let mut r = Scan { bytes, at: 4 };
    let Some(version) = r.u32() else { return Ok(()) };
    let wide = match version {
        1 => false,
        2 | 3 => true,
        _ => return Ok(()), // candle names the version
    };
    let len = |r: &mut Scan<'_>| if wide { r.u64() } else { r.u32().map(u64::from) };
    let (Some(_tensors), Some(kvs)) = (len(&mut r), len(&mut r)) else { return Ok(()) };
    let bad = |problem: String| Err((Some("general.alignment".to_owned()), problem));
    for _ in 0..kvs {
        let Some(key_len) = len(&mut r) else { return Ok(()) };
        let Some(mut key) = r.take(key_len) else { return Ok(()) };
        while let [rest @ .., 0] = key {
            key = rest;
        }
        let Some(ty) = r.u32() else { return Ok(()) };
        if key != b"general.alignment" {
            if r.skip_value(ty, wide, 0).is_none() {
                return Ok(());
            }
            continue;
        }
        let value = match ty {
            0 => r.take(1).map(|b| i64::from(b[0])),
            1 => r.take(1).map(|b| i64::from(b[0] as i8)),
            2 => r.take(2).map(|b| i64::from(u16::from_le_bytes([b[0], b[1]]))),
            3 => r.take(2).map(|b| i64::from(i16::from_le_bytes([b[0], b[1]]))),
            4 => r.u32().map(i64::from),
            5 => r.u32().map(|v| i64::from(v as i32)),
            _ => return bad("must be an integer of at most 32 bits".to_owned()),
        };
        let Some(a) = value else { return Ok(()) };
        if a <= 0 || !a.unsigned_abs().is_power_of_two() || a.unsigned_abs() > MAX_ALIGNMENT {
            return bad(format!("{a} must be a power of two from 1 to {MAX_ALIGNMENT}"));
        }
    }
    Ok(())
}

/// A cursor over header bytes; `None` when they run out.
struct Scan<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    fn take(&mut self, n: u64) -> Option<&'a [u8]> {
        let n = usize::try_from(n).ok()?;
        let end = self.at.checked_add(n)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }

    /// Skips one value of type `ty` (GGUF's numbering).
    fn skip_value(&mut self, ty: u32, wide: bool, depth: u32) -> Option<()> {
        // candle's limit: a value deeper than 64 is an error.
        if depth > 64 {
            return None;
        }
        let len = |r: &mut Self| if wide { r.u64() } else { r.u32().map(u64::from) };
        match ty {
            0 | 1 | 7 => self.take(1).map(drop),
            2 | 3 => self.take(2).map(drop),
            4..=6 => self.take(4).map(drop),
            10..=12 => self.take(8).map(drop),
            8 => {
                let n = len(self)?;
                self.take(n).map(drop)
            }
            9 => {
                let inner = self.u32()?;
                let n = len(self)?;
                let fixed = match inner {
                    0 | 1 | 7 => Some(1),
                    2 | 3 => Some(2),
                    4..=6 => Some(4),
                    10..=12 => Some(8),
                    _ => None,
                };
                match fixed {
                    Some(size) => self.take(n.checked_mul(size)?).map(drop),
                    None => {
                        for _ in 0..n {
                            self.skip_value(inner, wide, depth + 1)?;
                        }
                        Some(())
                    }
                }
            }
            _ => None,
        }
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
