//! Loads a Gemma model from a Hugging Face model directory or a GGUF file.
//!
//! `config.json` plus `model.safetensors` or the shards named by `model.safetensors.index.json`.
//! Shards are memory-mapped and tensors are converted to f32 one at a time and handed straight
//! to the [`LinearBuilder`], so a quantizing builder keeps peak memory near one f32 tensor plus
//! whatever it retains.
//!
//! Pre-quantized bitsandbytes 4-bit checkpoints (`quantization_config.quant_method ==
//! "bitsandbytes"`, the hub's `*-bnb-4bit` repos) load through the same path: each quantized
//! projection is rebuilt as an NF4 tensor from its companion tensors and handed to
//! [`LinearBuilder::build_quantized`], never dequantized and re-quantized.
//!
//! Both formats reach [`build_gemma`] through [`TensorSource`], which speaks HF tensor names:
//! [`SafetensorsStore`] directly, [`GgufGemma`] by translating them to llama.cpp's names.
//! [`load_model`] picks the format from the path.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, SafeTensorError};
use safetensors::{Dtype, SafeTensors};

use rupantor_quant::bnb_layout::{self, LayoutError, RawTensor};
use rupantor_quant::Nf4Tensor;

use crate::config::{ConfigError, ModelConfig, Quantization};
use crate::gemma::{Gemma, LayerWeights};
use crate::gguf::{GgufError, GgufGemma, GGUF_MAGIC};
use crate::linear::{
    DenseBuilder, Linear, LinearBuilder, LinearRole, LinearWeight, QuantizedWeight,
};

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where the text decoder lives: text-only checkpoints, then the two layouts of multimodal
/// Gemma-3 (transformers 4.x and 5.x).
const PREFIXES: [&str; 3] = ["model.", "language_model.model.", "model.language_model."];

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Random(#[from] crate::random::RandomError),
    #[error("{}: no config.json; expected a Hugging Face model directory", dir.display())]
    MissingConfig { dir: PathBuf },
    #[error("{}: {source}", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error("{}: no {SINGLE_FILE} or {INDEX_FILE}", dir.display())]
    MissingWeights { dir: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid safetensors index: {source}", path.display())]
    Index {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: truncated or corrupt safetensors file: {source}", file.display())]
    Corrupt {
        file: PathBuf,
        #[source]
        source: SafeTensorError,
    },
    #[error("tensor `{name}` not found in {}", display_paths(searched))]
    MissingTensor {
        name: String,
        searched: Vec<PathBuf>,
    },
    #[error(
        "tensor `{name}` in {}: shape {found:?} disagrees with config.json (expected {expected:?})",
        file.display()
    )]
    ShapeMismatch {
        name: String,
        file: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "tensor `{name}` in {}: unsupported dtype {dtype} (expected F32, F16 or BF16)",
        file.display()
    )]
    UnsupportedDtype {
        name: String,
        file: PathBuf,
        dtype: String,
    },
    #[error("tensor `{name}` in {}: {source}", file.display())]
    Quantized {
        name: String,
        file: PathBuf,
        #[source]
        source: LayoutError,
    },
    #[error(
        "tensor `{name}` in {} is bitsandbytes-quantized but {CONFIG_FILE} has no \
         quantization_config",
        file.display()
    )]
    UndeclaredQuantization { name: String, file: PathBuf },
    #[error("building `{name}`: {source}")]
    Build {
        name: String,
        #[source]
        source: candle_core::Error,
    },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(
        "{}: not a model: expected a Hugging Face model directory or a .gguf file",
        path.display()
    )]
    NotAModel { path: PathBuf },
}

/// Where [`build_gemma`] reads tensors from, addressed by Hugging Face names
/// (`model.layers.0.self_attn.q_proj.weight`).
pub trait TensorSource {
    fn contains(&self, name: &str) -> bool;

    /// The tensor as f32 on the host; an error naming the file and tensor when it is missing or
    /// its shape is not `expected`.
    fn load_f32(&self, name: &str, expected: &[usize]) -> Result<Tensor, LoadError>;

    /// The error for a tensor that is not there.
    fn missing(&self, name: &str) -> LoadError;

    /// The linear weight `name` when the source stores it already in NF4 (bitsandbytes
    /// checkpoints); `Ok(None)` means: read it with [`TensorSource::load_f32`].
    /// `declared` is the quantization config.json announces.
    fn load_prequantized(
        &self,
        _name: &str,
        _expected: &[usize],
        _declared: Option<Quantization>,
    ) -> Result<Option<Nf4Tensor>, LoadError> {
        Ok(None)
    }
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8-byte length + JSON header).
    data_start: usize,
    meta: Metadata,
}

/// A set of memory-mapped safetensors files, addressed by tensor name.
pub struct SafetensorsStore {
    shards: Vec<Shard>,
    names: HashMap<String, usize>,
}

impl std::fmt::Debug for SafetensorsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsStore")
            .field("files", &self.files())
            .field("tensors", &self.names.len())
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

impl SafetensorsStore {
    /// `model.safetensors` if present, else every shard named by `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self, LoadError> {
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open(&[single]);
        }
        let index_path = dir.join(INDEX_FILE);
        if !index_path.is_file() {
            return Err(LoadError::MissingWeights {
                dir: dir.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(&index_path).map_err(|source| LoadError::Io {
            path: index_path.clone(),
            source,
        })?;
        let index: Index = serde_json::from_str(&text).map_err(|source| LoadError::Index {
            path: index_path.clone(),
            source,
        })?;
        let files: BTreeSet<&String> = index.weight_map.values().collect();
        let paths: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        Self::open(&paths)
    }

    /// Maps and validates each file's header (offsets must exactly cover the file, so truncated
    /// files are caught here, before any tensor is read).
    pub fn open(paths: &[PathBuf]) -> Result<Self, LoadError> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut names = HashMap::new();
        for path in paths {
            let io = |source| LoadError::Io {
                path: path.clone(),
                source,
            };
            let file = File::open(path).map_err(io)?;
            // SAFETY: the mapping is read-only; as with every mmap-based safetensors reader, the
            // file must not be modified while the model loads.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
            let (header_len, meta) =
                SafeTensors::read_metadata(&mmap).map_err(|source| LoadError::Corrupt {
                    file: path.clone(),
                    source,
                })?;
            for name in meta.tensors().keys() {
                names.insert(name.clone(), shards.len());
            }
            shards.push(Shard {
                path: path.clone(),
                mmap,
                data_start: 8 + header_len,
                meta,
            });
        }
        Ok(Self { shards, names })
    }

    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    pub fn missing(&self, name: &str) -> LoadError {
        LoadError::MissingTensor {
            name: name.to_string(),
            searched: self.shards.iter().map(|s| s.path.clone()).collect(),
        }
    }

    /// Shape as stored, without reading data.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, LoadError> {
        let shard = &self.shards[*self.names.get(name).ok_or_else(|| self.missing(name))?];
        Ok(shard
            .meta
            .info(name)
            .ok_or_else(|| self.missing(name))?
            .shape
            .clone())
    }

    /// The file holding `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        Some(self.shards[*self.names.get(name)?].path.as_path())
    }

    /// One tensor's raw bytes, dtype and shape (a copy), for codecs that read their own layout.
    pub fn raw(&self, name: &str) -> Option<RawTensor> {
        let shard = &self.shards[*self.names.get(name)?];
        let info = shard.meta.info(name)?;
        let (start, end) = info.data_offsets;
        Some(RawTensor {
            dtype: info.dtype,
            shape: info.shape.clone(),
            data: shard.mmap[shard.data_start + start..shard.data_start + end].to_vec(),
        })
    }

    /// Rebuilds the NF4 weight `name` from its bitsandbytes companions (no re-quantization),
    /// checking its shape against `expected`.
    pub fn load_bnb_nf4(&self, name: &str, expected: &[usize]) -> Result<Nf4Tensor, LoadError> {
        let file = self
            .file_of(name)
            .ok_or_else(|| self.missing(name))?
            .to_path_buf();
        let nf4 = bnb_layout::from_tensors(name, |n| self.raw(n)).map_err(|source| {
            LoadError::Quantized {
                name: name.to_string(),
                file: file.clone(),
                source,
            }
        })?;
        if nf4.shape != expected {
            return Err(LoadError::ShapeMismatch {
                name: name.to_string(),
                file,
                expected: expected.to_vec(),
                found: nf4.shape,
            });
        }
        Ok(nf4)
    }

    /// Reads one tensor as f32 on the host, checking its shape first.
    pub fn load_f32(&self, name: &str, expected: &[usize]) -> Result<Tensor, LoadError> {
        let shard = &self.shards[*self.names.get(name).ok_or_else(|| self.missing(name))?];
        let info = shard.meta.info(name).ok_or_else(|| self.missing(name))?;
        if info.shape != expected {
            return Err(LoadError::ShapeMismatch {
                name: name.to_string(),
                file: shard.path.clone(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        let (start, end) = info.data_offsets;
        let bytes = &shard.mmap[shard.data_start + start..shard.data_start + end];
        let data = bytes_to_f32(info.dtype, bytes).ok_or_else(|| LoadError::UnsupportedDtype {
            name: name.to_string(),
            file: shard.path.clone(),
            dtype: format!("{:?}", info.dtype),
        })?;
        Tensor::from_vec(data, expected, &Device::Cpu).map_err(|source| LoadError::Build {
            name: name.to_string(),
            source,
        })
    }
}

impl TensorSource for SafetensorsStore {
    fn contains(&self, name: &str) -> bool {
        SafetensorsStore::contains(self, name)
    }

    fn load_f32(&self, name: &str, expected: &[usize]) -> Result<Tensor, LoadError> {
        SafetensorsStore::load_f32(self, name, expected)
    }

    fn missing(&self, name: &str) -> LoadError {
        SafetensorsStore::missing(self, name)
    }

    /// Rebuilt from the bitsandbytes companions when `name` has a quant state (and config.json
    /// declares the quantization); `None` for plain weights and modules bitsandbytes skipped.
    fn load_prequantized(
        &self,
        name: &str,
        expected: &[usize],
        declared: Option<Quantization>,
    ) -> Result<Option<Nf4Tensor>, LoadError> {
        let state = format!("{name}{}", bnb_layout::QUANT_STATE_SUFFIX);
        if !self.contains(&state) {
            return Ok(None);
        }
        if declared != Some(Quantization::BitsAndBytesNf4) {
            return Err(LoadError::UndeclaredQuantization {
                file: self
                    .file_of(&state)
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
                name: name.to_string(),
            });
        }
        self.load_bnb_nf4(name, expected).map(Some)
    }
}

/// Little-endian F32/F16/BF16 bytes to f32; `None` for other dtypes. Works on unaligned data
/// (safetensors headers are not always padded to the element size).
fn bytes_to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        Dtype::F32 => Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::BF16 => Some(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        ),
        Dtype::F16 => Some(
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        ),
        _ => None,
    }
}

/// Reads and resolves `dir/config.json`.
pub fn load_config(dir: &Path) -> Result<ModelConfig, LoadError> {
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        return Err(LoadError::MissingConfig {
            dir: dir.to_path_buf(),
        });
    }
    ModelConfig::from_file(&path).map_err(|source| LoadError::Config { path, source })
}

/// Loads an HF model directory with dense f32 linears on `device`.
pub fn load_gemma(dir: &Path, device: &Device) -> Result<Gemma, LoadError> {
    load_gemma_with(dir, device, &mut DenseBuilder::new(device))
}

/// Loads an HF model directory; every linear weight goes through `builder`.
pub fn load_gemma_with(
    dir: &Path,
    device: &Device,
    builder: &mut dyn LinearBuilder,
) -> Result<Gemma, LoadError> {
    let cfg = load_config(dir)?;
    let store = SafetensorsStore::open_dir(dir)?;
    build_gemma(cfg, &store, device, builder)
}

/// Loads a GGUF Gemma-2 / Gemma-3 file with dense f32 linears on `device`.
pub fn load_gemma_gguf_dense(path: &Path, device: &Device) -> Result<Gemma, LoadError> {
    load_gemma_gguf(path, device, &mut DenseBuilder::new(device))
}

/// Loads a GGUF Gemma-2 / Gemma-3 file (config from its metadata): every tensor is dequantized
/// to f32 on its own (its mapped pages released right after) and linear weights go straight to
/// `builder`, so with a quantizing builder peak memory is the built model plus one f32 tensor
/// and its encoded bytes (Gemma-3 270M Q4_K_M through [`crate::QLoraBuilder`]: 851 MiB peak,
/// 744 MiB after load, 671 MiB of it the f32 embedding).
pub fn load_gemma_gguf(
    path: &Path,
    device: &Device,
    builder: &mut dyn LinearBuilder,
) -> Result<Gemma, LoadError> {
    let source = GgufGemma::open(path)?;
    let cfg = source.config()?;
    build_gemma(cfg, &source, device, builder)
}

/// Whether `path` should be read as GGUF: a `.gguf` extension, or the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == GGUF_MAGIC
}

/// The random model a `random:<preset>[@<seed>]` "path" names (see [`crate::random`]); `None`
/// for a real path. Path-based APIs (the trainer's model loader, a run's recorded base model)
/// take random models this way.
pub fn random_model(path: &Path) -> Option<Result<crate::random::RandomModel, LoadError>> {
    let spec = path.to_str()?.strip_prefix(crate::random::PREFIX)?;
    Some(crate::random::RandomModel::parse(spec).map_err(LoadError::from))
}

/// Loads `path`: a Hugging Face model directory, a GGUF file, or `random:<preset>`.
pub fn load_model(
    path: &Path,
    device: &Device,
    builder: &mut dyn LinearBuilder,
) -> Result<Gemma, LoadError> {
    if let Some(random) = random_model(path) {
        let random = random?;
        return build_gemma(random.config(), &random.source(), device, builder);
    }
    let meta = std::fs::metadata(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_dir() {
        load_gemma_with(path, device, builder)
    } else if is_gguf(path) {
        load_gemma_gguf(path, device, builder)
    } else {
        Err(LoadError::NotAModel {
            path: path.to_path_buf(),
        })
    }
}

/// Builds the model from an open tensor source: one tensor at a time, norms and embedding moved
/// to `device`, linear weights passed to `builder` on the host.
pub fn build_gemma(
    cfg: ModelConfig,
    store: &dyn TensorSource,
    device: &Device,
    builder: &mut dyn LinearBuilder,
) -> Result<Gemma, LoadError> {
    let prefix = PREFIXES
        .iter()
        .find(|p| store.contains(&format!("{p}embed_tokens.weight")))
        .ok_or_else(|| store.missing("model.embed_tokens.weight"))?;
    let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let q_out = cfg.num_attention_heads * hd;
    let kv_out = cfg.num_key_value_heads * hd;
    let on_device = |name: String, shape: &[usize]| -> Result<Tensor, LoadError> {
        let t = store.load_f32(&name, shape)?;
        to_device(&name, t, device)
    };

    let embed_name = format!("{prefix}embed_tokens.weight");
    let embed_host = store.load_f32(&embed_name, &[cfg.vocab_size, h])?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("{prefix}layers.{i}.");
        let attn = |n: &str| format!("{p}self_attn.{n}.weight");
        let mlp = |n: &str| format!("{p}mlp.{n}.weight");
        let mut linear = |name: String, role: LinearRole, shape: [usize; 2]| {
            load_linear(store, &cfg, builder, name, role, Some(i), shape)
        };
        let q_proj = linear(attn("q_proj"), LinearRole::QProj, [q_out, h])?;
        let k_proj = linear(attn("k_proj"), LinearRole::KProj, [kv_out, h])?;
        let v_proj = linear(attn("v_proj"), LinearRole::VProj, [kv_out, h])?;
        let o_proj = linear(attn("o_proj"), LinearRole::OProj, [h, q_out])?;
        let gate_proj = linear(mlp("gate_proj"), LinearRole::GateProj, [inter, h])?;
        let up_proj = linear(mlp("up_proj"), LinearRole::UpProj, [inter, h])?;
        let down_proj = linear(mlp("down_proj"), LinearRole::DownProj, [h, inter])?;
        let norm = |n: &str| on_device(format!("{p}{n}.weight"), &[h]);
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(on_device(attn("q_norm"), &[hd])?),
                Some(on_device(attn("k_norm"), &[hd])?),
            )
        } else {
            (None, None)
        };
        layers.push(LayerWeights {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            gate_proj,
            up_proj,
            down_proj,
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
            q_norm,
            k_norm,
        });
    }
    let final_norm = on_device(format!("{prefix}norm.weight"), &[h])?;

    // The embedding in the model's activation dtype, on the device; a tied lm_head is built
    // from this very tensor, so a dense head shares its storage (on a GPU: one bf16 copy of a
    // 256k x 3584 matrix, not two). On the CPU the builder still sees the host f32 values it
    // can inspect (an exact-Q8 head).
    let dtype = builder.dtype();
    let embed = to_device(&embed_name, embed_host, device)?
        .to_dtype(dtype)
        .map_err(|source| LoadError::Build {
            name: embed_name.clone(),
            source,
        })?;
    let lm_head = if cfg.tie_word_embeddings {
        build_linear(
            builder,
            embed_name.clone(),
            LinearRole::LmHead,
            None,
            embed.clone(),
        )?
    } else {
        let name = ["lm_head.weight", "language_model.lm_head.weight"]
            .into_iter()
            .find(|n| store.contains(n))
            .ok_or_else(|| store.missing("lm_head.weight"))?;
        load_linear(
            store,
            &cfg,
            builder,
            name.to_string(),
            LinearRole::LmHead,
            None,
            [cfg.vocab_size, h],
        )?
    };
    Gemma::new(cfg, embed, layers, final_norm, lm_head).map_err(|source| LoadError::Build {
        name: "model".into(),
        source,
    })
}

fn to_device(name: &str, t: Tensor, device: &Device) -> Result<Tensor, LoadError> {
    t.to_device(device).map_err(|source| LoadError::Build {
        name: name.to_string(),
        source,
    })
}

/// One linear weight: as stored when the source holds it in NF4 already (bitsandbytes), read as
/// f32 otherwise.
fn load_linear(
    store: &dyn TensorSource,
    cfg: &ModelConfig,
    builder: &mut dyn LinearBuilder,
    name: String,
    role: LinearRole,
    layer: Option<usize>,
    shape: [usize; 2],
) -> Result<Box<dyn Linear>, LoadError> {
    if let Some(weight) = store.load_prequantized(&name, &shape, cfg.quantization)? {
        return builder
            .build_quantized(QuantizedWeight {
                name: name.clone(),
                role,
                layer,
                weight,
            })
            .map_err(|source| LoadError::Build { name, source });
    }
    let weight = store.load_f32(&name, &shape)?;
    build_linear(builder, name, role, layer, weight)
}

fn build_linear(
    builder: &mut dyn LinearBuilder,
    name: String,
    role: LinearRole,
    layer: Option<usize>,
    weight: Tensor,
) -> Result<Box<dyn Linear>, LoadError> {
    builder
        .build(LinearWeight {
            name: name.clone(),
            role,
            layer,
            weight,
        })
        .map_err(|source| LoadError::Build { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_half_precisions() {
        let vals = [1.5f32, -2.25, 0.0];
        let bf: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let f16: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(bytes_to_f32(Dtype::BF16, &bf).unwrap(), vals);
        assert_eq!(bytes_to_f32(Dtype::F16, &f16).unwrap(), vals);
        assert_eq!(bytes_to_f32(Dtype::F32, &f32b).unwrap(), vals);
        // Unaligned start must work too.
        let mut shifted = vec![0u8];
        shifted.extend(&f32b);
        assert_eq!(bytes_to_f32(Dtype::F32, &shifted[1..]).unwrap(), vals);
        assert!(bytes_to_f32(Dtype::U8, &[1, 2]).is_none());
    }
}
