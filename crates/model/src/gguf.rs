//! GGUF (llama.cpp's model format, versions 2 and 3): a memory-mapped reader, ggml block
//! dequantizers, and a Gemma-2 / Gemma-3 view of a GGUF checkpoint for the shared loader.
//!
//! File layout (all little-endian):
//!
//! ```text
//! "GGUF" | version u32 | tensor_count u64 | kv_count u64
//! kv_count x  (key: string, value_type u32, value)
//! tensor_count x (name: string, n_dims u32, ne[n_dims] u64, ggml_type u32, offset u64)
//! padding to `general.alignment` (default 32)
//! tensor data; each tensor at data_start + offset, offsets aligned too
//! ```
//!
//! Strings are `u64 length + UTF-8 bytes`; arrays are `elem_type u32, count u64, elems`. `ne[0]`
//! is the fastest-varying dimension, so a PyTorch `[out, in]` weight has `ne = [in, out]`;
//! [`GgufTensorInfo::shape`] gives the PyTorch order.
//!
//! The dequantizers follow ggml's reference `dequantize_row_*` block layouts and evaluate every
//! product in the same order in f32 (no fused multiply-add), so they agree bit for bit with
//! gguf-py's numpy dequantizers, which transformers uses to load GGUF files (golden fixture:
//! scripts/fixtures/gguf_blocks.py).

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;
use serde_json::{json, Map, Value};

use crate::config::{ConfigError, GemmaConfig, ModelConfig};
use crate::loader::{LoadError, TensorSource};

/// `"GGUF"` as the first four bytes.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of every tensor offset when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Elements per k-quant super-block.
pub const QK_K: usize = 256;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal; this bounds the recursion a hostile file can ask for.
const MAX_ARRAY_NESTING: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a GGUF file (starts with {found:02x?}, expected \"GGUF\")", path.display())]
    BadMagic { path: PathBuf, found: Vec<u8> },
    #[error("{}: unsupported GGUF version {version}{hint} (supported: 2, 3)", path.display())]
    UnsupportedVersion {
        path: PathBuf,
        version: u32,
        hint: &'static str,
    },
    #[error(
        "{}: truncated or corrupt GGUF file: {what} needs bytes {offset}..{end}, but the file \
         has {len}",
        path.display()
    )]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        end: u64,
        len: u64,
    },
    #[error("{}: corrupt GGUF file: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("{}: tensor `{tensor}` has unknown ggml type id {type_id}", path.display())]
    UnknownType {
        path: PathBuf,
        tensor: String,
        type_id: u32,
    },
    #[error(
        "{}: tensor `{tensor}` is stored as {ty} (ggml type id {}), which rupantor cannot \
         dequantize (supported: {})",
        path.display(),
        ty.id(),
        GgmlType::supported_names()
    )]
    UnsupportedType {
        path: PathBuf,
        tensor: String,
        ty: GgmlType,
    },
    #[error(
        "{}: tensor `{tensor}`: data at bytes {start}..{end} of the data section lies outside \
         the file (data section is {available} bytes; truncated file?)",
        path.display()
    )]
    OutOfBounds {
        path: PathBuf,
        tensor: String,
        start: u64,
        end: u64,
        available: u64,
    },
    #[error("{}: tensor `{tensor}` not found", path.display())]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{}: metadata `{key}`: {problem}", path.display())]
    Metadata {
        path: PathBuf,
        key: String,
        problem: String,
    },
}

/// ggml tensor element types (`enum ggml_type`), with their block geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    Iq2Xxs,
    Iq2Xs,
    Iq3Xxs,
    Iq1S,
    Iq4Nl,
    Iq3S,
    Iq2S,
    Iq4Xs,
    I8,
    I16,
    I32,
    I64,
    F64,
    Iq1M,
    BF16,
    Tq1_0,
    Tq2_0,
    Mxfp4,
}

impl GgmlType {
    const ALL: [GgmlType; 32] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::Q8K,
        GgmlType::Iq2Xxs,
        GgmlType::Iq2Xs,
        GgmlType::Iq3Xxs,
        GgmlType::Iq1S,
        GgmlType::Iq4Nl,
        GgmlType::Iq3S,
        GgmlType::Iq2S,
        GgmlType::Iq4Xs,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::Iq1M,
        GgmlType::BF16,
        GgmlType::Tq1_0,
        GgmlType::Tq2_0,
        GgmlType::Mxfp4,
    ];

    /// The types [`dequantize_blocks`] handles.
    pub const DEQUANTIZABLE: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// The on-disk type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Q8K => 15,
            GgmlType::Iq2Xxs => 16,
            GgmlType::Iq2Xs => 17,
            GgmlType::Iq3Xxs => 18,
            GgmlType::Iq1S => 19,
            GgmlType::Iq4Nl => 20,
            GgmlType::Iq3S => 21,
            GgmlType::Iq2S => 22,
            GgmlType::Iq4Xs => 23,
            GgmlType::I8 => 24,
            GgmlType::I16 => 25,
            GgmlType::I32 => 26,
            GgmlType::I64 => 27,
            GgmlType::F64 => 28,
            GgmlType::Iq1M => 29,
            GgmlType::BF16 => 30,
            GgmlType::Tq1_0 => 34,
            GgmlType::Tq2_0 => 35,
            GgmlType::Mxfp4 => 39,
        }
    }

    /// `None` for ids ggml never assigned (or retired, like 4, 5 and 31-33).
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// ggml's name (`GGML_TYPE_Q4_K` -> `Q4_K`).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Q8K => "Q8_K",
            GgmlType::Iq2Xxs => "IQ2_XXS",
            GgmlType::Iq2Xs => "IQ2_XS",
            GgmlType::Iq3Xxs => "IQ3_XXS",
            GgmlType::Iq1S => "IQ1_S",
            GgmlType::Iq4Nl => "IQ4_NL",
            GgmlType::Iq3S => "IQ3_S",
            GgmlType::Iq2S => "IQ2_S",
            GgmlType::Iq4Xs => "IQ4_XS",
            GgmlType::I8 => "I8",
            GgmlType::I16 => "I16",
            GgmlType::I32 => "I32",
            GgmlType::I64 => "I64",
            GgmlType::F64 => "F64",
            GgmlType::Iq1M => "IQ1_M",
            GgmlType::BF16 => "BF16",
            GgmlType::Tq1_0 => "TQ1_0",
            GgmlType::Tq2_0 => "TQ2_0",
            GgmlType::Mxfp4 => "MXFP4",
        }
    }

    /// `(elements per block, bytes per block)`, as ggml's `type_traits` (gguf-py's
    /// `GGML_QUANT_SIZES`).
    pub fn block_geometry(self) -> (usize, usize) {
        match self {
            GgmlType::F32 | GgmlType::I32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 | GgmlType::I16 => (1, 2),
            GgmlType::I8 => (1, 1),
            GgmlType::I64 | GgmlType::F64 => (1, 8),
            GgmlType::Q4_0 | GgmlType::Iq4Nl => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q8_1 => (32, 40),
            GgmlType::Mxfp4 => (32, 17),
            GgmlType::Q2K => (QK_K, 84),
            GgmlType::Q3K => (QK_K, 110),
            GgmlType::Q4K => (QK_K, 144),
            GgmlType::Q5K => (QK_K, 176),
            GgmlType::Q6K => (QK_K, 210),
            GgmlType::Q8K => (QK_K, 292),
            GgmlType::Iq2Xxs => (QK_K, 66),
            GgmlType::Iq2Xs => (QK_K, 74),
            GgmlType::Iq3Xxs => (QK_K, 98),
            GgmlType::Iq1S => (QK_K, 50),
            GgmlType::Iq3S => (QK_K, 110),
            GgmlType::Iq2S => (QK_K, 82),
            GgmlType::Iq4Xs => (QK_K, 136),
            GgmlType::Iq1M => (QK_K, 56),
            GgmlType::Tq1_0 => (QK_K, 54),
            GgmlType::Tq2_0 => (QK_K, 66),
        }
    }

    pub fn can_dequantize(self) -> bool {
        Self::DEQUANTIZABLE.contains(&self)
    }

    fn supported_names() -> String {
        Self::DEQUANTIZABLE
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Metadata value types (`enum gguf_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl GgufValueType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            Self::U8 => 0,
            Self::I8 => 1,
            Self::U16 => 2,
            Self::I16 => 3,
            Self::U32 => 4,
            Self::I32 => 5,
            Self::F32 => 6,
            Self::Bool => 7,
            Self::String => 8,
            Self::Array => 9,
            Self::U64 => 10,
            Self::I64 => 11,
            Self::F64 => 12,
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Elements all of `elem_type` (arrays may nest).
    Array {
        elem_type: GgufValueType,
        values: Vec<GgufValue>,
    },
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    pub fn value_type(&self) -> GgufValueType {
        match self {
            Self::U8(_) => GgufValueType::U8,
            Self::I8(_) => GgufValueType::I8,
            Self::U16(_) => GgufValueType::U16,
            Self::I16(_) => GgufValueType::I16,
            Self::U32(_) => GgufValueType::U32,
            Self::I32(_) => GgufValueType::I32,
            Self::F32(_) => GgufValueType::F32,
            Self::Bool(_) => GgufValueType::Bool,
            Self::String(_) => GgufValueType::String,
            Self::Array { .. } => GgufValueType::Array,
            Self::U64(_) => GgufValueType::U64,
            Self::I64(_) => GgufValueType::I64,
            Self::F64(_) => GgufValueType::F64,
        }
    }

    /// Any integer type, when it fits (converters are free to pick the width).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Floats of either width, and integers (exactly representable or not).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array { values, .. } => Some(values),
            _ => None,
        }
    }
}

/// Where one tensor lives and how it is encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `ne[0]` varies fastest.
    pub ne: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
    /// Bytes of encoded data.
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    /// Dimensions in PyTorch (row-major, slowest first) order: `ne` reversed.
    pub fn shape(&self) -> Vec<usize> {
        // `ne` entries were checked to fit in usize when the file was opened.
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn numel(&self) -> usize {
        self.ne.iter().product::<u64>() as usize
    }
}

/// A memory-mapped GGUF file: parsed header, metadata and tensor directory; tensor data is
/// read (and dequantized) on demand.
pub struct GgufFile {
    path: PathBuf,
    data: Bytes,
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

/// Bounds-checked little-endian reads over the header.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        let end = (self.pos as u64).checked_add(n);
        match end {
            Some(end) if end <= self.buf.len() as u64 => {
                let s = &self.buf[self.pos..end as usize];
                self.pos = end as usize;
                Ok(s)
            }
            _ => Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what(),
                offset: self.pos as u64,
                end: end.unwrap_or(u64::MAX),
                len: self.buf.len() as u64,
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::Corrupt {
            path: self.path.to_path_buf(),
            detail: format!("{} is not valid UTF-8", what()),
        })
    }

    fn value(
        &mut self,
        ty: GgufValueType,
        depth: usize,
        what: &dyn Fn() -> String,
    ) -> Result<GgufValue, GgufError> {
        Ok(match ty {
            GgufValueType::U8 => GgufValue::U8(self.array::<1>(what)?[0]),
            GgufValueType::I8 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            GgufValueType::U32 => GgufValue::U32(self.u32(what)?),
            GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            GgufValueType::U64 => GgufValue::U64(self.u64(what)?),
            GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            GgufValueType::Bool => match self.array::<1>(what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => {
                    return Err(self.corrupt(format!("{}: boolean byte {b} is not 0 or 1", what())))
                }
            },
            GgufValueType::String => GgufValue::String(self.string(what)?),
            GgufValueType::Array => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(self.corrupt(format!(
                        "{}: arrays nested deeper than {MAX_ARRAY_NESTING}",
                        what()
                    )));
                }
                let elem_id = self.u32(what)?;
                let elem_type = GgufValueType::from_id(elem_id).ok_or_else(|| {
                    self.corrupt(format!("{}: unknown array element type {elem_id}", what()))
                })?;
                let count = self.u64(what)?;
                // Never trust the count for an allocation: every element takes at least a byte.
                let remaining = (self.buf.len() - self.pos) as u64;
                let mut values = Vec::with_capacity(count.min(remaining) as usize);
                for i in 0..count {
                    let elem_what = || format!("{} [element {i} of {count}]", what());
                    values.push(self.value(elem_type, depth + 1, &elem_what)?);
                }
                GgufValue::Array { elem_type, values }
            }
        })
    }

    fn corrupt(&self, detail: String) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_path_buf(),
            detail,
        }
    }
}

impl GgufFile {
    /// Maps `path` and parses everything but the tensor data; every tensor's extent is checked
    /// against the file size here, so a truncated file fails before any weight is read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: read-only mapping; as with any mmap-based model reader, the file must not be
        // modified while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path.to_path_buf(), Bytes::Mapped(mmap))
    }

    /// Parses an in-memory GGUF image (`path` is only used in messages).
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(path.into(), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, data: Bytes) -> Result<Self, GgufError> {
        let buf: &[u8] = &data;
        let mut c = Cursor {
            buf,
            pos: 0,
            path: &path,
        };
        if buf.len() < 4 || buf[..4] != GGUF_MAGIC {
            return Err(GgufError::BadMagic {
                path: path.clone(),
                found: buf[..buf.len().min(4)].to_vec(),
            });
        }
        c.pos = 4;
        let version = c.u32(&|| "the version".into())?;
        if version != 2 && version != 3 {
            let hint = if matches!(version.swap_bytes(), 2 | 3) {
                " (a big-endian file; only little-endian GGUF is supported)"
            } else if version == 1 {
                " (GGUF v1 used 32-bit counts; re-convert with a current llama.cpp)"
            } else {
                ""
            };
            return Err(GgufError::UnsupportedVersion {
                path: path.clone(),
                version,
                hint,
            });
        }
        let tensor_count = c.u64(&|| "the tensor count".into())?;
        let kv_count = c.u64(&|| "the metadata count".into())?;
        let remaining = (buf.len() - c.pos) as u64;

        let mut metadata = Vec::with_capacity(kv_count.min(remaining) as usize);
        let mut meta_index = HashMap::new();
        for i in 0..kv_count {
            let key = c.string(&|| format!("metadata key {i} of {kv_count}"))?;
            let what = || format!("metadata `{key}`");
            let type_id = c.u32(&what)?;
            let ty = GgufValueType::from_id(type_id)
                .ok_or_else(|| c.corrupt(format!("{}: unknown value type {type_id}", what())))?;
            let value = c.value(ty, 0, &what)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(c.corrupt(format!("duplicate metadata key `{key}`")));
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => match &metadata[i].1 {
                GgufValue::U32(a) if a.is_power_of_two() => u64::from(*a),
                other => {
                    return Err(GgufError::Metadata {
                        path: path.clone(),
                        key: "general.alignment".into(),
                        problem: format!("must be a u32 power of two, found {other:?}"),
                    })
                }
            },
        };

        let mut tensors = Vec::with_capacity(tensor_count.min(remaining) as usize);
        let mut tensor_index = HashMap::new();
        for i in 0..tensor_count {
            let name = c.string(&|| format!("tensor name {i} of {tensor_count}"))?;
            let what = || format!("tensor info of `{name}`");
            let n_dims = c.u32(&what)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(c.corrupt(format!(
                    "tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
                )));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                ne.push(c.u64(&what)?);
            }
            let type_id = c.u32(&what)?;
            let offset = c.u64(&what)?;
            let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownType {
                path: path.clone(),
                tensor: name.clone(),
                type_id,
            })?;
            let numel = ne
                .iter()
                .try_fold(1u64, |acc, &d| {
                    acc.checked_mul(d).filter(|&n| n <= i64::MAX as u64)
                })
                .filter(|&n| usize::try_from(n).is_ok())
                .ok_or_else(|| c.corrupt(format!("tensor `{name}`: dimensions {ne:?} overflow")))?;
            let (block, type_size) = ggml_type.block_geometry();
            if ne[0] % block as u64 != 0 {
                return Err(c.corrupt(format!(
                    "tensor `{name}`: row length {} is not a multiple of the {ggml_type} block \
                     size {block}",
                    ne[0]
                )));
            }
            let n_bytes = numel / block as u64 * type_size as u64;
            if offset % alignment != 0 {
                return Err(c.corrupt(format!(
                    "tensor `{name}`: data offset {offset} is not a multiple of the alignment \
                     {alignment}"
                )));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(c.corrupt(format!("duplicate tensor name `{name}`")));
            }
            tensors.push(GgufTensorInfo {
                name,
                ne,
                ggml_type,
                offset,
                n_bytes,
            });
        }

        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let available = (buf.len() as u64).saturating_sub(data_offset);
        for t in &tensors {
            let end = t.offset.checked_add(t.n_bytes);
            if end.is_none_or(|e| e > available) {
                return Err(GgufError::OutOfBounds {
                    path: path.clone(),
                    tensor: t.name.clone(),
                    start: t.offset,
                    end: end.unwrap_or(u64::MAX),
                    available,
                });
            }
        }

        Ok(Self {
            path,
            data,
            version,
            metadata,
            meta_index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// `general.alignment`, or 32.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Key/value pairs in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn meta_error(&self, key: &str, problem: String) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            problem,
        }
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        want: &str,
        conv: impl Fn(&'a GgufValue) -> Option<T>,
    ) -> Result<Option<T>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => conv(v)
                .map(Some)
                .ok_or_else(|| self.meta_error(key, format!("expected {want}, found {v:?}"))),
        }
    }

    /// A string value; `Ok(None)` when absent, an error when of another type.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.typed(key, "a string", GgufValue::as_str)
    }

    /// A non-negative integer of any width.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.typed(key, "a non-negative integer", GgufValue::as_u64)
    }

    pub fn get_usize(&self, key: &str) -> Result<Option<usize>, GgufError> {
        self.typed(key, "a non-negative integer", |v| {
            v.as_u64().and_then(|v| usize::try_from(v).ok())
        })
    }

    /// A float (or integer) value.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        self.typed(key, "a number", GgufValue::as_f64)
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.typed(key, "a boolean", GgufValue::as_bool)
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>, GgufError> {
        self.typed(key, "an array of strings", |v| {
            v.as_array()?.iter().map(GgufValue::as_str).collect()
        })
    }

    /// An array of numbers as f32 (e.g. `tokenizer.ggml.scores`).
    pub fn get_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>, GgufError> {
        self.typed(key, "an array of numbers", |v| {
            v.as_array()?
                .iter()
                .map(|e| e.as_f64().map(|x| x as f32))
                .collect()
        })
    }

    /// An array of integers (e.g. `tokenizer.ggml.token_type`).
    pub fn get_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>, GgufError> {
        self.typed(key, "an array of integers", |v| {
            v.as_array()?.iter().map(GgufValue::as_i64).collect()
        })
    }

    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    fn info_or_missing(&self, name: &str) -> Result<&GgufTensorInfo, GgufError> {
        self.tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            })
    }

    /// The encoded bytes of one tensor (a view into the mapping).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], GgufError> {
        let t = self.info_or_missing(name)?;
        // In bounds: checked against the file length in `parse`.
        let start = (self.data_offset + t.offset) as usize;
        Ok(&self.data[start..start + t.n_bytes as usize])
    }

    /// One tensor decoded to f32, row-major in [`GgufTensorInfo::shape`] order.
    ///
    /// For a mapped file the tensor's pages are then dropped from this process's resident set
    /// (they stay in the page cache and fault back in if read again), so streaming a model
    /// through this never holds the whole file resident next to the decoded weights.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let t = self.info_or_missing(name)?;
        let bytes = self.tensor_bytes(name)?;
        let mut out = vec![0f32; t.numel()];
        let decoded = dequantize_blocks(t.ggml_type, bytes, &mut out);
        self.release(t);
        decoded.map_err(|e| match e {
            DequantError::Unsupported(ty) => GgufError::UnsupportedType {
                path: self.path.clone(),
                tensor: name.to_string(),
                ty,
            },
            // Sizes were derived from the same geometry when the file was opened.
            DequantError::Length { .. } => GgufError::Corrupt {
                path: self.path.clone(),
                detail: format!("tensor `{name}`: {e}"),
            },
        })?;
        Ok(out)
    }
}

impl GgufFile {
    /// `MADV_DONTNEED` over a tensor's bytes: purely advisory, errors are ignored.
    fn release(&self, t: &GgufTensorInfo) {
        #[cfg(unix)]
        if let Bytes::Mapped(m) = &self.data {
            // SAFETY: the mapping is a read-only shared mapping of a file (`Mmap::map`); dropping
            // its pages only makes later reads fault them back in from the file with the same
            // contents, so outstanding borrows of the mapping observe no change. (Private or
            // anonymous mappings would read back zeros; this one is neither.)
            let _ = unsafe {
                m.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    (self.data_offset + t.offset) as usize,
                    t.n_bytes as usize,
                )
            };
        }
        #[cfg(not(unix))]
        let _ = t;
    }
}

/// Why [`dequantize_blocks`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantError {
    #[error("cannot dequantize ggml type {0} (id {id})", id = .0.id())]
    Unsupported(GgmlType),
    #[error(
        "{ty}: {bytes} bytes do not encode {elements} elements (block of {block} elements = \
         {type_size} bytes)"
    )]
    Length {
        ty: GgmlType,
        bytes: usize,
        elements: usize,
        block: usize,
        type_size: usize,
    },
}

/// Decodes `data` (whole blocks of `ty`) into `out`, whose length must be the number of encoded
/// elements.
pub fn dequantize_blocks(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
    let (block, type_size) = ty.block_geometry();
    if out.len() % block != 0 || data.len() != out.len() / block * type_size {
        return Err(DequantError::Length {
            ty,
            bytes: data.len(),
            elements: out.len(),
            block,
            type_size,
        });
    }
    let kernel: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = f16_at(b, 0),
        GgmlType::BF16 => |b, y| y[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        GgmlType::Q4_0 => dequant_q4_0,
        GgmlType::Q4_1 => dequant_q4_1,
        GgmlType::Q5_0 => dequant_q5_0,
        GgmlType::Q5_1 => dequant_q5_1,
        GgmlType::Q8_0 => dequant_q8_0,
        GgmlType::Q4K => dequant_q4_k,
        GgmlType::Q5K => dequant_q5_k,
        GgmlType::Q6K => dequant_q6_k,
        other => return Err(DequantError::Unsupported(other)),
    };
    for (b, y) in data
        .chunks_exact(type_size)
        .zip(out.chunks_exact_mut(block))
    {
        kernel(b, y);
    }
    Ok(())
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// `block_q4_0 { ggml_half d; uint8_t qs[16]; }`: element `j` is the low nibble of `qs[j]`,
/// element `j + 16` the high nibble; `y = (q - 8) * d`.
fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// `block_q4_1 { ggml_half d, m; uint8_t qs[16]; }`: `y = q * d + m`.
fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// `block_q5_0 { ggml_half d; uint8_t qh[4]; uint8_t qs[16]; }`: the fifth bit of element `j`
/// is bit `j` of the little-endian u32 `qh`; `y = (q - 16) * d`.
fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = (((qs[j] & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

/// `block_q5_1 { ggml_half d, m; uint8_t qh[4]; uint8_t qs[16]; }`: `y = q * d + m`.
fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = ((qs[j] & 0x0F) as u32 | h0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
    }
}

/// `block_q8_0 { ggml_half d; int8_t qs[32]; }`: `y = q * d`.
fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..34].iter().enumerate() {
        y[j] = q as i8 as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes of a Q4_K/Q5_K
/// block (ggml's `get_scale_min_k4`): sub-blocks 0-3 keep theirs in the low 6 bits of bytes
/// 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 take their low nibbles from bytes 8-11 and their
/// top two bits from the top bits of bytes 0-3 (scales) and 4-7 (mins).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `block_q4_K { ggml_half d, dmin; uint8_t scales[12]; uint8_t qs[128]; }`: eight sub-blocks
/// of 32; each 32-byte chunk of `qs` holds sub-block `2i` in its low nibbles and `2i + 1` in
/// its high nibbles; `y = (d * sc) * q - (dmin * m)`.
fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        let out = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0x0F) as f32 - min1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - min2;
        }
    }
}

/// `block_q5_K { ggml_half d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; }`:
/// Q4_K plus a fifth bit per element: bit `2i` of `qh[l]` for element `l` of sub-block `2i`,
/// bit `2i + 1` for sub-block `2i + 1`.
fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for chunk in 0..4 {
        let ql = &qs[chunk * 32..chunk * 32 + 32];
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        let out = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            out[l] = d1 * ((ql[l] & 0x0F) + h1) as f32 - min1;
            out[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - min2;
        }
    }
}

/// `block_q6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; ggml_half d; }`: two
/// halves of 128; in each, element `l + 32k` (k = 0..4) takes its low four bits from a nibble
/// of `ql` and its top two from bits `2k..2k+2` of `qh[l]`; sixteen int8 scales, one per 16
/// elements; `y = (d * sc) * (q - 32)`.
fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[half * 64..half * 64 + 64];
        let qh = &b[128 + half * 32..128 + half * 32 + 32];
        let sc = &b[192 + half * 8..192 + half * 8 + 8];
        let out = &mut y[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * sc[is] as i8 as f32 * q1 as f32;
            out[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
            out[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
            out[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Gemma from GGUF
// ---------------------------------------------------------------------------------------------

/// A Gemma-2 / Gemma-3 GGUF checkpoint (llama.cpp's `convert_hf_to_gguf.py` layout) presented
/// under Hugging Face tensor names, so [`crate::loader::build_gemma`] loads it like a model
/// directory.
///
/// What the conversion changed, and is undone here:
/// * names: `token_embd`, `blk.{i}.attn_q` ... (see [`GgufGemma::gguf_name`]);
/// * dimensions: `ne` is reversed (handled by [`GgufTensorInfo::shape`]);
/// * RMSNorm weights: llama.cpp's norm is `x * w`, HF Gemma's is `x * (1 + w)`, so the converter
///   stored `w + 1` for every tensor whose name ends in `norm.weight` (the four layer norms, the
///   q/k norms and the final norm); 1 is subtracted again in f32 (exactly what transformers'
///   GGUF loader does).
#[derive(Debug)]
pub struct GgufGemma {
    file: GgufFile,
    arch: String,
}

/// HF name suffixes inside `model.layers.{i}.` and their llama.cpp names.
const LAYER_NAMES: [(&str, &str); 13] = [
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("input_layernorm.weight", "attn_norm.weight"),
    (
        "post_attention_layernorm.weight",
        "post_attention_norm.weight",
    ),
    ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
    ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
];

impl GgufGemma {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let file = GgufFile::open(path)?;
        Self::new(file)
    }

    /// Checks `general.architecture` (gemma2 or gemma3).
    pub fn new(file: GgufFile) -> Result<Self, LoadError> {
        let arch = file
            .get_str("general.architecture")?
            .ok_or_else(|| GgufError::Metadata {
                path: file.path().to_path_buf(),
                key: "general.architecture".into(),
                problem: "missing".into(),
            })?
            .to_string();
        if arch != "gemma2" && arch != "gemma3" {
            return Err(LoadError::Config {
                path: file.path().to_path_buf(),
                source: ConfigError::UnknownArchitecture {
                    model_type: Some(arch),
                    architectures: vec![],
                },
            });
        }
        Ok(Self { file, arch })
    }

    pub fn gguf(&self) -> &GgufFile {
        &self.file
    }

    /// `gemma2` or `gemma3` (`general.architecture`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The llama.cpp name of an HF-layout tensor name (`model.*` or `lm_head.weight`).
    pub fn gguf_name(hf_name: &str) -> Option<String> {
        match hf_name {
            "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
            "model.norm.weight" => return Some("output_norm.weight".into()),
            "lm_head.weight" => return Some("output.weight".into()),
            _ => {}
        }
        let rest = hf_name.strip_prefix("model.layers.")?;
        let (idx, suffix) = rest.split_once('.')?;
        let i: usize = idx.parse().ok()?;
        LAYER_NAMES
            .iter()
            .find(|(hf, _)| *hf == suffix)
            .map(|(_, g)| format!("blk.{i}.{g}"))
    }

    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    fn required_usize(&self, k: &str) -> Result<usize, LoadError> {
        let key = self.key(k);
        self.file
            .get_usize(&key)?
            .ok_or_else(|| self.meta_err(&key, "missing".into()))
    }

    fn meta_err(&self, key: &str, problem: String) -> LoadError {
        LoadError::Gguf(GgufError::Metadata {
            path: self.file.path().to_path_buf(),
            key: key.to_string(),
            problem,
        })
    }

    /// The model configuration from the `gemma2.*` / `gemma3.*` metadata, as the equivalent
    /// transformers `config.json` (4.x dialect) resolved by [`ModelConfig`]: the same defaults
    /// and checks apply.
    ///
    /// What GGUF does not carry, and the values used (llama.cpp hard-codes the same ones):
    /// * `query_pre_attn_scalar`: `head_dim`, except the 27B models (Gemma-2 46 layers,
    ///   Gemma-3 62 layers) where it is `hidden_size / num_attention_heads`. A non-standard
    ///   `{arch}.attention.scale` key (the score multiplier) overrides this when present.
    /// * Gemma-3 local RoPE base: 10 000 (`{arch}.rope.freq_base_swa` overrides); global base
    ///   from `rope.freq_base` (default 1 000 000); linear `rope.scaling.factor` applies to
    ///   global layers only.
    /// * Gemma-3 sliding pattern: 5 local : 1 global (`sliding_window_pattern` 6), unless
    ///   `{arch}.attention.sliding_window_pattern` gives a period or a per-layer bool array.
    /// * Gemma-2 sliding layers: the even ones; softcaps from `attn_logit_softcapping` /
    ///   `final_logit_softcapping` (Gemma-3 has none).
    /// * vocabulary size: rows of `token_embd.weight`; tied lm_head unless `output.weight`
    ///   exists; eos ids: `tokenizer.ggml.eos_token_id` plus `eot_token_id` (`<end_of_turn>`)
    ///   when present.
    pub fn config_json(&self) -> Result<Value, LoadError> {
        let f = &self.file;
        let arch = self.arch.as_str();
        let hidden = self.required_usize("embedding_length")?;
        let layers = self.required_usize("block_count")?;
        let inter = self.required_usize("feed_forward_length")?;
        let heads = self.required_usize("attention.head_count")?;
        let kv_key = self.key("attention.head_count_kv");
        let kv_heads = match f.get(&kv_key) {
            None => heads,
            Some(v) => match (v.as_u64(), v.as_array()) {
                (Some(n), _) => n as usize,
                // Per-layer counts: Gemma uses one value for every layer.
                (None, Some(arr)) => {
                    let vals: Option<Vec<u64>> = arr.iter().map(GgufValue::as_u64).collect();
                    match vals.as_deref() {
                        Some([first, rest @ ..]) if rest.iter().all(|v| v == first) => {
                            *first as usize
                        }
                        _ => {
                            return Err(self.meta_err(
                                &kv_key,
                                format!("per-layer head counts must all be equal, found {v:?}"),
                            ))
                        }
                    }
                }
                _ => {
                    return Err(self.meta_err(&kv_key, format!("expected an integer, found {v:?}")))
                }
            },
        };
        if heads == 0 {
            return Err(self.meta_err(&self.key("attention.head_count"), "is 0".into()));
        }
        let head_dim = f
            .get_usize(&self.key("attention.key_length"))?
            .unwrap_or(hidden / heads);
        if let Some(v) = f.get_usize(&self.key("attention.value_length"))? {
            if v != head_dim {
                return Err(self.meta_err(
                    &self.key("attention.value_length"),
                    format!("{v} differs from key_length {head_dim}; Gemma needs them equal"),
                ));
            }
        }
        let embd = f
            .tensor_info("token_embd.weight")
            .ok_or_else(|| self.missing("model.embed_tokens.weight"))?;
        let vocab = embd.shape()[0];
        if let Some(v) = f.get_usize(&self.key("vocab_size"))? {
            if v != vocab {
                return Err(self.meta_err(
                    &self.key("vocab_size"),
                    format!("{v} disagrees with token_embd.weight's {vocab} rows"),
                ));
            }
        }

        let is_27b = match arch {
            "gemma2" => layers == 46,
            _ => layers == 62,
        };
        let query_pre_attn_scalar = match f.get_f64(&self.key("attention.scale"))? {
            Some(s) if s > 0.0 => 1.0 / (s * s),
            Some(s) => return Err(self.meta_err(&self.key("attention.scale"), format!("{s} <= 0"))),
            None if is_27b => (hidden / heads) as f64,
            None => head_dim as f64,
        };

        let mut c = Map::new();
        c.insert(
            "model_type".into(),
            json!(if arch == "gemma2" {
                "gemma2"
            } else {
                "gemma3_text"
            }),
        );
        c.insert("vocab_size".into(), json!(vocab));
        c.insert("hidden_size".into(), json!(hidden));
        c.insert("intermediate_size".into(), json!(inter));
        c.insert("num_hidden_layers".into(), json!(layers));
        c.insert("num_attention_heads".into(), json!(heads));
        c.insert("num_key_value_heads".into(), json!(kv_heads));
        c.insert("head_dim".into(), json!(head_dim));
        c.insert("query_pre_attn_scalar".into(), json!(query_pre_attn_scalar));
        c.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
        c.insert(
            "tie_word_embeddings".into(),
            json!(f.tensor_info("output.weight").is_none()),
        );
        if let Some(eps) = f.get_f64(&self.key("attention.layer_norm_rms_epsilon"))? {
            c.insert("rms_norm_eps".into(), json!(eps));
        }
        if let Some(n) = f.get_usize(&self.key("context_length"))? {
            c.insert("max_position_embeddings".into(), json!(n));
        }
        if let Some(w) = f.get_usize(&self.key("attention.sliding_window"))? {
            c.insert("sliding_window".into(), json!(w));
        }
        if let Some(theta) = f.get_f64(&self.key("rope.freq_base"))? {
            c.insert("rope_theta".into(), json!(theta));
        }
        if let Some(theta) = f.get_f64(&self.key("rope.freq_base_swa"))? {
            c.insert("rope_local_base_freq".into(), json!(theta));
        }
        match f.get_str(&self.key("rope.scaling.type"))? {
            None | Some("none") => {}
            Some(ty) => {
                let factor = f
                    .get_f64(&self.key("rope.scaling.factor"))?
                    .ok_or_else(|| {
                        self.meta_err(&self.key("rope.scaling.factor"), "missing".into())
                    })?;
                c.insert(
                    "rope_scaling".into(),
                    json!({"rope_type": ty, "factor": factor}),
                );
            }
        }
        let softcap = |k: &str| -> Result<Value, LoadError> {
            Ok(match f.get_f64(&self.key(k))? {
                Some(v) if v > 0.0 => json!(v),
                _ => Value::Null,
            })
        };
        if arch == "gemma2" {
            c.insert(
                "attn_logit_softcapping".into(),
                softcap("attn_logit_softcapping")?,
            );
            c.insert(
                "final_logit_softcapping".into(),
                softcap("final_logit_softcapping")?,
            );
        } else {
            c.insert("attn_logit_softcapping".into(), Value::Null);
            c.insert(
                "final_logit_softcapping".into(),
                softcap("final_logit_softcapping")?,
            );
        }
        let pattern_key = self.key("attention.sliding_window_pattern");
        match f.get(&pattern_key) {
            None => {}
            Some(v) => match (v.as_u64(), v.as_array()) {
                (Some(n), _) => {
                    if n == 0 {
                        return Err(self.meta_err(&pattern_key, "is 0".into()));
                    }
                    let types: Vec<&str> = (0..layers as u64)
                        .map(|i| {
                            if i % n < n - 1 {
                                "sliding_attention"
                            } else {
                                "full_attention"
                            }
                        })
                        .collect();
                    c.insert("layer_types".into(), json!(types));
                }
                (None, Some(arr)) => {
                    let types: Option<Vec<&str>> = arr
                        .iter()
                        .map(|b| {
                            b.as_bool().map(|s| {
                                if s {
                                    "sliding_attention"
                                } else {
                                    "full_attention"
                                }
                            })
                        })
                        .collect();
                    let types = types.ok_or_else(|| {
                        self.meta_err(&pattern_key, format!("expected bools, found {v:?}"))
                    })?;
                    c.insert("layer_types".into(), json!(types));
                }
                _ => {
                    return Err(self.meta_err(
                        &pattern_key,
                        format!("expected a period or a bool per layer, found {v:?}"),
                    ))
                }
            },
        }
        if let Some(id) = f.get_u64("tokenizer.ggml.bos_token_id")? {
            c.insert("bos_token_id".into(), json!(id));
        }
        let mut eos = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = f.get_u64(key)? {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        if !eos.is_empty() {
            c.insert("eos_token_id".into(), json!(eos));
        }
        if let Some(id) = f.get_u64("tokenizer.ggml.padding_token_id")? {
            c.insert("pad_token_id".into(), json!(id));
        }
        Ok(Value::Object(c))
    }

    /// [`GgufGemma::config_json`] resolved.
    pub fn config(&self) -> Result<ModelConfig, LoadError> {
        let json = self.config_json()?;
        let config_error = |source| LoadError::Config {
            path: self.file.path().to_path_buf(),
            source,
        };
        let raw: GemmaConfig = serde_json::from_value(json).map_err(|e| {
            config_error(ConfigError::Invalid(format!(
                "GGUF metadata does not form a Gemma config: {e}"
            )))
        })?;
        raw.resolve().map_err(config_error)
    }

    fn missing(&self, hf_name: &str) -> LoadError {
        let name = match Self::gguf_name(hf_name) {
            Some(g) => format!("{g} ({hf_name})"),
            None => hf_name.to_string(),
        };
        LoadError::MissingTensor {
            name,
            searched: vec![self.file.path().to_path_buf()],
        }
    }
}

impl TensorSource for GgufGemma {
    fn contains(&self, name: &str) -> bool {
        Self::gguf_name(name).is_some_and(|g| self.file.tensor_info(&g).is_some())
    }

    fn missing(&self, name: &str) -> LoadError {
        GgufGemma::missing(self, name)
    }

    fn load_f32(&self, name: &str, expected: &[usize]) -> Result<Tensor, LoadError> {
        let gname = Self::gguf_name(name).ok_or_else(|| self.missing(name))?;
        let info = self
            .file
            .tensor_info(&gname)
            .ok_or_else(|| self.missing(name))?;
        let shape = info.shape();
        if shape != expected {
            return Err(LoadError::ShapeMismatch {
                name: format!("{gname} ({name})"),
                file: self.file.path().to_path_buf(),
                expected: expected.to_vec(),
                found: shape,
            });
        }
        let mut data = self.file.dequantize(&gname)?;
        if name.ends_with("norm.weight") {
            data.iter_mut().for_each(|w| *w -= 1.0);
        }
        Tensor::from_vec(data, shape, &Device::Cpu).map_err(|source| LoadError::Build {
            name: gname,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16b(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn type_ids_round_trip_and_retired_ids_are_unknown() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
        }
        for id in [4, 5, 31, 32, 33, 36, 99, u32::MAX] {
            assert_eq!(GgmlType::from_id(id), None, "{id}");
        }
        assert_eq!(GgmlType::Q4K.block_geometry(), (256, 144));
        assert_eq!(GgmlType::Q6K.block_geometry(), (256, 210));
        assert_eq!(GgmlType::Q5_0.block_geometry(), (32, 22));
    }

    #[test]
    fn q8_0_block() {
        let mut b = f16b(0.5).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut y = [0f32; 32];
        dequantize_blocks(GgmlType::Q8_0, &b, &mut y).unwrap();
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, (i as f32 - 16.0) * 0.5);
        }
    }

    #[test]
    fn q5_0_high_bits_come_from_qh() {
        // Every low nibble 0; qh sets the fifth bit of elements 1 and 17 only.
        let mut b = f16b(1.0).to_vec();
        b.extend((1u32 << 1 | 1 << 17).to_le_bytes());
        b.extend([0u8; 16]);
        let mut y = [0f32; 32];
        dequantize_blocks(GgmlType::Q5_0, &b, &mut y).unwrap();
        for (i, v) in y.iter().enumerate() {
            let want = if i == 1 || i == 17 { 0.0 } else { -16.0 };
            assert_eq!(*v, want, "element {i}");
        }
    }

    #[test]
    fn q4_k_six_bit_scale_packing() {
        // Sub-block j gets scale j + 1 and min 2j (upper sub-blocks use the split encoding).
        let mut scales = [0u8; 12];
        for j in 0..8 {
            let (sc, m) = ((j + 1) as u8, (2 * j + 40) as u8);
            if j < 4 {
                scales[j] = sc;
                scales[j + 4] = m;
            } else {
                scales[j + 4] = (sc & 0x0F) | ((m & 0x0F) << 4);
                scales[j - 4] |= (sc >> 4) << 6;
                scales[j] |= (m >> 4) << 6;
            }
        }
        for j in 0..8 {
            assert_eq!(
                scale_min_k4(j, &scales),
                ((j + 1) as u8, (2 * j + 40) as u8)
            );
        }
        let mut b = f16b(2.0).to_vec();
        b.extend(f16b(0.25));
        b.extend(scales);
        // Every element of every sub-block: q = 3 (low) / 5 (high nibble).
        b.extend([0x53u8; 128]);
        let mut y = [0f32; 256];
        dequantize_blocks(GgmlType::Q4K, &b, &mut y).unwrap();
        for (i, v) in y.iter().enumerate() {
            let j = i / 32;
            let q = if j % 2 == 0 { 3.0 } else { 5.0 };
            let want = 2.0 * (j + 1) as f32 * q - 0.25 * (2 * j + 40) as f32;
            assert_eq!(*v, want, "element {i}");
        }
    }

    #[test]
    fn q6_k_layout() {
        // ql nibbles 0, qh 2 bits = 2 -> q = 32 - 32 = 0 everywhere except element 5, which
        // gets low nibble 1 -> q = 1; scale of its group (0) is -3, d = 0.5.
        let mut b = vec![0u8; 210];
        b[5] = 0x01;
        for h in &mut b[128..192] {
            *h = 0b1010_1010;
        }
        for s in &mut b[192..208] {
            *s = (-3i8) as u8;
        }
        b[208..210].copy_from_slice(&f16b(0.5));
        let mut y = [0f32; 256];
        dequantize_blocks(GgmlType::Q6K, &b, &mut y).unwrap();
        for (i, v) in y.iter().enumerate() {
            let want = if i == 5 { 0.5 * -3.0 * 1.0 } else { 0.0 };
            assert_eq!(*v, want, "element {i}");
        }
    }

    #[test]
    fn dequantize_checks_lengths_and_types() {
        let mut y = [0f32; 32];
        assert!(matches!(
            dequantize_blocks(GgmlType::Q8_0, &[0u8; 33], &mut y),
            Err(DequantError::Length { .. })
        ));
        assert_eq!(
            dequantize_blocks(GgmlType::Iq2Xxs, &[0u8; 66], &mut [0f32; 256]),
            Err(DequantError::Unsupported(GgmlType::Iq2Xxs))
        );
    }

    #[test]
    fn gguf_names() {
        assert_eq!(
            GgufGemma::gguf_name("model.layers.17.pre_feedforward_layernorm.weight").as_deref(),
            Some("blk.17.ffn_norm.weight")
        );
        assert_eq!(
            GgufGemma::gguf_name("model.layers.0.self_attn.o_proj.weight").as_deref(),
            Some("blk.0.attn_output.weight")
        );
        assert_eq!(
            GgufGemma::gguf_name("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(
            GgufGemma::gguf_name("model.layers.x.mlp.up_proj.weight"),
            None
        );
        assert_eq!(
            GgufGemma::gguf_name("language_model.model.norm.weight"),
            None
        );
    }
}
