//! Gemma-2 / Gemma-3 `config.json` in both dialects, resolved to per-layer facts.
//!
//! Two dialects exist in the wild:
//! * transformers 4.x (what the hub checkpoints were saved with): `rope_theta`, Gemma-3
//!   `rope_local_base_freq`, `sliding_window_pattern`, `rope_scaling`, no `layer_types`;
//!   multimodal Gemma-3 nests the text model under `text_config` and leaves most fields at
//!   their class defaults, so the defaults below mirror transformers' config classes.
//! * transformers 5.x: `layer_types` and `rope_parameters`, either flat or keyed by layer type.
//!
//! [`GemmaConfig`] is the raw, serde-facing form; [`ModelConfig`] is what the model consumes.

use std::path::Path;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid config.json: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "unknown architecture: model_type {model_type:?}, architectures {architectures:?} \
         (supported model_type: gemma2, gemma3, gemma3_text)"
    )]
    UnknownArchitecture {
        model_type: Option<String>,
        architectures: Vec<String>,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error(
        "unsupported quantization_config: {0} (supported: bitsandbytes 4-bit NF4 with double \
         quantization, i.e. the `*-bnb-4bit` checkpoints)"
    )]
    UnsupportedQuantization(String),
}

/// `quantization_config` of a checkpoint saved pre-quantized (transformers'
/// `BitsAndBytesConfig.to_dict()`; other methods only need `quant_method` to be rejected).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct QuantizationConfig {
    pub quant_method: Option<String>,
    pub load_in_4bit: Option<bool>,
    /// Newer transformers write the flags with a leading underscore as well.
    #[serde(rename = "_load_in_4bit")]
    pub load_in_4bit_private: Option<bool>,
    pub load_in_8bit: Option<bool>,
    #[serde(rename = "_load_in_8bit")]
    pub load_in_8bit_private: Option<bool>,
    pub bnb_4bit_quant_type: Option<String>,
    pub bnb_4bit_use_double_quant: Option<bool>,
    /// Element type the packed codes are stored as; only `uint8` (the default) is read.
    pub bnb_4bit_quant_storage: Option<String>,
}

/// How the linear weights of a checkpoint are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// bitsandbytes NF4, blocksize 64, double-quantized absmax: each quantized `W` comes with
    /// `W.absmax`, `W.quant_map`, `W.nested_absmax`, `W.nested_quant_map` and
    /// `W.quant_state.bitsandbytes__nf4`.
    BitsAndBytesNf4,
}

impl QuantizationConfig {
    fn resolve(&self) -> Result<Quantization, ConfigError> {
        let bad = |m: String| Err(ConfigError::UnsupportedQuantization(m));
        match self.quant_method.as_deref() {
            Some("bitsandbytes") => {}
            Some(other) => return bad(format!("quant_method {other:?}")),
            None => return bad("no quant_method".into()),
        }
        if self.load_in_8bit.or(self.load_in_8bit_private) == Some(true) {
            return bad("bitsandbytes 8-bit (LLM.int8) weights".into());
        }
        if self.load_in_4bit.or(self.load_in_4bit_private) != Some(true) {
            return bad("bitsandbytes without load_in_4bit".into());
        }
        match self.bnb_4bit_quant_type.as_deref() {
            Some("nf4") => {}
            other => return bad(format!("bnb_4bit_quant_type {other:?}")),
        }
        if self.bnb_4bit_use_double_quant != Some(true) {
            return bad("bnb_4bit_use_double_quant is not true".into());
        }
        match self.bnb_4bit_quant_storage.as_deref() {
            None | Some("uint8") => {}
            Some(other) => return bad(format!("bnb_4bit_quant_storage {other:?}")),
        }
        Ok(Quantization::BitsAndBytesNf4)
    }
}

/// Which family the checkpoint belongs to; decides defaults and the q/k-norm weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Gemma2,
    Gemma3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_pytorch_tanh`: the tanh approximation of GELU.
    GeluTanh,
}

/// `bos_token_id` / `eos_token_id` are ints in Gemma-2 configs, lists in Gemma-3 ones.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// One RoPE parameter set (`rope_scaling` in 4.x, one entry of `rope_parameters` in 5.x).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct RopeParameters {
    /// Old configs spell it `type`.
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
}

/// 5.x `rope_parameters`: flat, or keyed by layer type.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeParametersField {
    Flat(RopeParameters),
    ByLayerType {
        full_attention: Option<RopeParameters>,
        sliding_attention: Option<RopeParameters>,
    },
}

impl<'de> Deserialize<'de> for RopeParametersField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = Value::deserialize(d)?;
        let obj = v
            .as_object()
            .ok_or_else(|| D::Error::custom("rope_parameters must be an object"))?;
        // Keyed form is recognised by its keys: a flat set never has object-valued entries.
        if obj.contains_key("full_attention") || obj.contains_key("sliding_attention") {
            let get = |k: &str| -> Result<Option<RopeParameters>, D::Error> {
                obj.get(k)
                    .filter(|v| !v.is_null())
                    .map(|v| RopeParameters::deserialize(v).map_err(D::Error::custom))
                    .transpose()
            };
            Ok(RopeParametersField::ByLayerType {
                full_attention: get("full_attention")?,
                sliding_attention: get("sliding_attention")?,
            })
        } else {
            RopeParameters::deserialize(v)
                .map(RopeParametersField::Flat)
                .map_err(D::Error::custom)
        }
    }
}

/// Distinguishes an absent key (take the class default) from an explicit `null` (feature off),
/// which matters for the softcaps: Gemma-2 defaults them on, Gemma-3 writes `null`.
fn double_option<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// The raw `config.json`, both dialects, every field optional so class defaults can apply.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GemmaConfig {
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub query_pre_attn_scalar: Option<f64>,
    #[serde(default, deserialize_with = "double_option")]
    pub attn_logit_softcapping: Option<Option<f64>>,
    #[serde(default, deserialize_with = "double_option")]
    pub final_logit_softcapping: Option<Option<f64>>,
    #[serde(default, deserialize_with = "double_option")]
    pub sliding_window: Option<Option<usize>>,
    pub hidden_activation: Option<String>,
    pub hidden_act: Option<String>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub use_bidirectional_attention: Option<bool>,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
    pub pad_token_id: Option<TokenIds>,
    pub max_position_embeddings: Option<usize>,
    pub rope_theta: Option<f64>,
    pub rope_local_base_freq: Option<f64>,
    pub sliding_window_pattern: Option<usize>,
    /// Gemma-3 270M / 1B hub configs write the pattern with a leading underscore.
    #[serde(rename = "_sliding_window_pattern")]
    pub sliding_window_pattern_private: Option<usize>,
    pub layer_types: Option<Vec<String>>,
    pub rope_scaling: Option<RopeParameters>,
    pub rope_parameters: Option<RopeParametersField>,
    pub text_config: Option<Box<GemmaConfig>>,
    pub quantization_config: Option<QuantizationConfig>,
}

/// Per-layer facts the forward pass needs.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerConfig {
    pub is_sliding: bool,
    /// RoPE base frequency (theta) for this layer.
    pub rope_base: f64,
    /// Linear RoPE scaling factor (positions are divided by it); 1.0 means none.
    pub rope_linear_factor: f64,
    /// Attention window in tokens (query sees keys with `q - k < window`), sliding layers only.
    pub window: Option<usize>,
}

/// The resolved configuration: no optional-with-default fields left.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub query_pre_attn_scalar: f64,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub sliding_window: usize,
    pub hidden_activation: Activation,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub max_position_embeddings: usize,
    /// Gemma-3 normalises q and k per head before RoPE.
    pub qk_norm: bool,
    pub layers: Vec<LayerConfig>,
    /// `None`: linear weights are stored as F32/F16/BF16.
    pub quantization: Option<Quantization>,
}

impl ModelConfig {
    /// Reads and resolves `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        GemmaConfig::from_file(path)?.resolve()
    }

    pub fn from_json_str(s: &str) -> Result<Self, ConfigError> {
        GemmaConfig::from_json_str(s)?.resolve()
    }
}

/// transformers' class defaults (Gemma2Config / Gemma3TextConfig).
struct Defaults {
    vocab_size: usize,
    max_position_embeddings: usize,
    rope_theta: f64,
    attn_softcap: Option<f64>,
    final_softcap: Option<f64>,
}

const GEMMA2_DEFAULTS: Defaults = Defaults {
    vocab_size: 256_000,
    max_position_embeddings: 8192,
    rope_theta: 10_000.0,
    attn_softcap: Some(50.0),
    final_softcap: Some(30.0),
};

const GEMMA3_DEFAULTS: Defaults = Defaults {
    vocab_size: 262_208,
    max_position_embeddings: 131_072,
    rope_theta: 1_000_000.0,
    attn_softcap: None,
    final_softcap: None,
};

impl GemmaConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    pub fn from_json_str(s: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(s).map_err(|source| ConfigError::Parse {
            path: "<string>".into(),
            source,
        })
    }

    fn arch_of(&self) -> Option<Arch> {
        match self.model_type.as_deref() {
            Some("gemma2") => Some(Arch::Gemma2),
            Some("gemma3") | Some("gemma3_text") => Some(Arch::Gemma3),
            Some(_) => None,
            // Some hand-written configs only carry `architectures`.
            None => self.architectures.as_ref().and_then(|a| {
                a.iter().find_map(|a| match a.as_str() {
                    "Gemma2ForCausalLM" => Some(Arch::Gemma2),
                    "Gemma3ForCausalLM" | "Gemma3ForConditionalGeneration" => Some(Arch::Gemma3),
                    _ => None,
                })
            }),
        }
    }

    /// Applies class defaults, picks the text config out of multimodal checkpoints, and works out
    /// per-layer sliding / RoPE facts.
    pub fn resolve(&self) -> Result<ModelConfig, ConfigError> {
        let unknown = || ConfigError::UnknownArchitecture {
            model_type: self.model_type.clone(),
            architectures: self.architectures.clone().unwrap_or_default(),
        };
        let arch = self.arch_of().ok_or_else(unknown)?;

        let merged;
        let c: &GemmaConfig = match &self.text_config {
            Some(text) => {
                // Token ids set on the wrapper win: transformers serialises the text config's
                // class defaults (eos 1) even where the wrapper says [1, 106].
                let mut t = (**text).clone();
                t.bos_token_id = self.bos_token_id.clone().or(t.bos_token_id);
                t.eos_token_id = self.eos_token_id.clone().or(t.eos_token_id);
                t.pad_token_id = self.pad_token_id.clone().or(t.pad_token_id);
                if t.tie_word_embeddings.is_none() {
                    t.tie_word_embeddings = self.tie_word_embeddings;
                }
                if let Some(mt) = &t.model_type {
                    if mt != "gemma3_text" && mt != "gemma3" {
                        return Err(unknown());
                    }
                }
                merged = t;
                &merged
            }
            None => self,
        };

        let d = match arch {
            Arch::Gemma2 => &GEMMA2_DEFAULTS,
            Arch::Gemma3 => &GEMMA3_DEFAULTS,
        };
        let num_hidden_layers = c.num_hidden_layers.unwrap_or(26);
        let num_attention_heads = c.num_attention_heads.unwrap_or(8);
        let num_key_value_heads = c.num_key_value_heads.unwrap_or(4);
        let head_dim = c.head_dim.unwrap_or(256);
        let hidden_size = c.hidden_size.unwrap_or(2304);
        let intermediate_size = c.intermediate_size.unwrap_or(9216);
        let vocab_size = c.vocab_size.unwrap_or(d.vocab_size);
        let sliding_window = c.sliding_window.flatten().unwrap_or(4096);

        let invalid = |m: String| Err(ConfigError::Invalid(m));
        for (name, v) in [
            ("num_hidden_layers", num_hidden_layers),
            ("num_attention_heads", num_attention_heads),
            ("num_key_value_heads", num_key_value_heads),
            ("head_dim", head_dim),
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("vocab_size", vocab_size),
            ("sliding_window", sliding_window),
        ] {
            if v == 0 {
                return invalid(format!("{name} must be positive"));
            }
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return invalid(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of \
                 num_key_value_heads {num_key_value_heads}"
            ));
        }
        if head_dim % 2 != 0 {
            return invalid(format!("head_dim {head_dim} must be even for RoPE"));
        }
        if c.use_bidirectional_attention == Some(true) {
            return invalid(
                "use_bidirectional_attention (embedding models) is not supported".into(),
            );
        }
        if c.attention_bias == Some(true) {
            return invalid("attention_bias = true is not supported by Gemma".into());
        }
        let act = c
            .hidden_activation
            .as_deref()
            .unwrap_or("gelu_pytorch_tanh");
        let hidden_activation = match act {
            "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
            other => return invalid(format!("unsupported hidden_activation {other:?}")),
        };

        let is_sliding: Vec<bool> = match &c.layer_types {
            Some(types) => {
                if types.len() != num_hidden_layers {
                    return invalid(format!(
                        "layer_types has {} entries, num_hidden_layers is {num_hidden_layers}",
                        types.len()
                    ));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        other => Err(ConfigError::Invalid(format!(
                            "unsupported layer type {other:?}"
                        ))),
                    })
                    .collect::<Result<_, _>>()?
            }
            None => match arch {
                Arch::Gemma2 => (0..num_hidden_layers).map(|i| i % 2 == 0).collect(),
                Arch::Gemma3 => {
                    let pattern = c
                        .sliding_window_pattern
                        .or(c.sliding_window_pattern_private)
                        .unwrap_or(6);
                    if pattern == 0 {
                        return invalid("sliding_window_pattern must be positive".into());
                    }
                    (0..num_hidden_layers)
                        .map(|i| (i + 1) % pattern != 0)
                        .collect()
                }
            },
        };

        let (global_rope, local_rope) = self.rope_for(c, arch, d)?;
        let layers = is_sliding
            .iter()
            .map(|&s| {
                let (base, factor) = if s { local_rope } else { global_rope };
                LayerConfig {
                    is_sliding: s,
                    rope_base: base,
                    rope_linear_factor: factor,
                    window: s.then_some(sliding_window),
                }
            })
            .collect();

        let first = |t: &Option<TokenIds>| t.as_ref().and_then(|t| t.to_vec().first().copied());
        Ok(ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
            query_pre_attn_scalar: c.query_pre_attn_scalar.unwrap_or(256.0),
            attn_logit_softcapping: c.attn_logit_softcapping.unwrap_or(d.attn_softcap),
            final_logit_softcapping: c.final_logit_softcapping.unwrap_or(d.final_softcap),
            sliding_window,
            hidden_activation,
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(true),
            bos_token_id: match &c.bos_token_id {
                None => Some(2),
                ids => first(ids),
            },
            eos_token_ids: c
                .eos_token_id
                .as_ref()
                .map(TokenIds::to_vec)
                .unwrap_or_else(|| vec![1]),
            pad_token_id: match &c.pad_token_id {
                None => Some(0),
                ids => first(ids),
            },
            max_position_embeddings: c
                .max_position_embeddings
                .unwrap_or(d.max_position_embeddings),
            qk_norm: arch == Arch::Gemma3,
            layers,
            // Multimodal checkpoints keep it on the wrapper, next to `text_config`.
            quantization: self
                .quantization_config
                .as_ref()
                .or(c.quantization_config.as_ref())
                .map(QuantizationConfig::resolve)
                .transpose()?,
        })
    }

    /// (base, linear factor) for global and local layers.
    #[allow(clippy::type_complexity)]
    fn rope_for(
        &self,
        c: &GemmaConfig,
        arch: Arch,
        d: &Defaults,
    ) -> Result<((f64, f64), (f64, f64)), ConfigError> {
        let factor_of = |p: Option<&RopeParameters>| -> Result<f64, ConfigError> {
            let Some(p) = p else { return Ok(1.0) };
            match p.rope_type.as_deref() {
                None | Some("default") => Ok(1.0),
                Some("linear") => {
                    let f = p.factor.ok_or_else(|| {
                        ConfigError::Invalid("linear rope scaling without factor".into())
                    })?;
                    if f.is_nan() || f <= 0.0 {
                        return Err(ConfigError::Invalid(format!(
                            "rope scaling factor must be positive, got {f}"
                        )));
                    }
                    Ok(f)
                }
                Some(other) => Err(ConfigError::Invalid(format!(
                    "unsupported rope_type {other:?} (supported: default, linear)"
                ))),
            }
        };
        let global_theta = c.rope_theta.unwrap_or(d.rope_theta);
        let local_theta = c.rope_local_base_freq.unwrap_or(10_000.0);
        match (&c.rope_parameters, arch) {
            (
                Some(RopeParametersField::ByLayerType {
                    full_attention,
                    sliding_attention,
                }),
                _,
            ) => {
                let g = (
                    full_attention
                        .as_ref()
                        .and_then(|p| p.rope_theta)
                        .unwrap_or(global_theta),
                    factor_of(full_attention.as_ref())?,
                );
                let l = (
                    sliding_attention
                        .as_ref()
                        .and_then(|p| p.rope_theta)
                        .unwrap_or(match arch {
                            Arch::Gemma2 => global_theta,
                            Arch::Gemma3 => local_theta,
                        }),
                    factor_of(sliding_attention.as_ref())?,
                );
                Ok((g, l))
            }
            // Gemma-2 has one rotary embedding shared by every layer, scaling included.
            (Some(RopeParametersField::Flat(p)), Arch::Gemma2) => {
                let r = (p.rope_theta.unwrap_or(global_theta), factor_of(Some(p))?);
                Ok((r, r))
            }
            (None, Arch::Gemma2) => {
                let r = (global_theta, factor_of(c.rope_scaling.as_ref())?);
                Ok((r, r))
            }
            // Gemma-3 (as HF 4.x): scaling applies to the global rotary embedding only; the local
            // one is a plain default RoPE at `rope_local_base_freq`.
            (Some(RopeParametersField::Flat(p)), Arch::Gemma3) => Ok((
                (p.rope_theta.unwrap_or(global_theta), factor_of(Some(p))?),
                (local_theta, 1.0),
            )),
            (None, Arch::Gemma3) => Ok((
                (global_theta, factor_of(c.rope_scaling.as_ref())?),
                (local_theta, 1.0),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hub's google/gemma-2-9b-it config.json (transformers 4.42 dialect).
    const GEMMA2_9B_V4: &str = r#"{
      "architectures": ["Gemma2ForCausalLM"],
      "attention_bias": false,
      "attention_dropout": 0.0,
      "attn_logit_softcapping": 50.0,
      "bos_token_id": 2,
      "cache_implementation": "hybrid",
      "eos_token_id": 1,
      "final_logit_softcapping": 30.0,
      "head_dim": 256,
      "hidden_act": "gelu_pytorch_tanh",
      "hidden_activation": "gelu_pytorch_tanh",
      "hidden_size": 3584,
      "initializer_range": 0.02,
      "intermediate_size": 14336,
      "max_position_embeddings": 8192,
      "model_type": "gemma2",
      "num_attention_heads": 16,
      "num_hidden_layers": 42,
      "num_key_value_heads": 8,
      "pad_token_id": 0,
      "query_pre_attn_scalar": 256,
      "rms_norm_eps": 1e-06,
      "rope_theta": 10000.0,
      "sliding_window": 4096,
      "sliding_window_size": 4096,
      "torch_dtype": "bfloat16",
      "transformers_version": "4.42.0.dev0",
      "use_cache": true,
      "vocab_size": 256000
    }"#;

    /// A Gemma-2 config as transformers 5.x writes it.
    const GEMMA2_V5: &str = r#"{
      "architectures": ["Gemma2ForCausalLM"],
      "attn_logit_softcapping": 50.0,
      "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
      "dtype": "float32",
      "final_logit_softcapping": 30.0,
      "head_dim": 16, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 64,
      "intermediate_size": 128,
      "layer_types": ["sliding_attention", "full_attention", "full_attention", "sliding_attention"],
      "max_position_embeddings": 512, "model_type": "gemma2",
      "num_attention_heads": 4, "num_hidden_layers": 4, "num_key_value_heads": 2,
      "query_pre_attn_scalar": 24, "rms_norm_eps": 1e-06,
      "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
      "sliding_window": 8, "tie_word_embeddings": true,
      "transformers_version": "5.0.0", "vocab_size": 300
    }"#;

    /// google/gemma-3-4b-it: multimodal wrapper, text config mostly class defaults.
    const GEMMA3_4B_V4: &str = r#"{
      "architectures": ["Gemma3ForConditionalGeneration"],
      "boi_token_index": 255999,
      "eoi_token_index": 256000,
      "eos_token_id": [1, 106],
      "image_token_index": 262144,
      "initializer_range": 0.02,
      "mm_tokens_per_image": 256,
      "model_type": "gemma3",
      "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024
      },
      "torch_dtype": "bfloat16",
      "transformers_version": "4.50.0.dev0",
      "vision_config": {"hidden_size": 1152, "model_type": "siglip_vision_model"}
    }"#;

    /// google/gemma-3-1b-it style text-only config (4.x dialect).
    const GEMMA3_1B_V4: &str = r#"{
      "architectures": ["Gemma3ForCausalLM"],
      "attention_bias": false, "attention_dropout": 0.0,
      "attn_logit_softcapping": null,
      "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
      "final_logit_softcapping": null,
      "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
      "initializer_range": 0.02, "intermediate_size": 6912,
      "max_position_embeddings": 32768, "model_type": "gemma3_text",
      "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
      "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
      "rope_local_base_freq": 10000, "rope_scaling": null, "rope_theta": 1000000,
      "sliding_window": 512, "sliding_window_pattern": 6,
      "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
      "use_cache": true, "vocab_size": 262144
    }"#;

    /// Gemma-3 as transformers 5.x writes it: layer_types and rope_parameters keyed by type.
    const GEMMA3_V5: &str = r#"{
      "architectures": ["Gemma3ForCausalLM"],
      "attn_logit_softcapping": null, "bos_token_id": 2, "eos_token_id": 1,
      "final_logit_softcapping": null, "head_dim": 16, "hidden_size": 64,
      "intermediate_size": 128,
      "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
      "max_position_embeddings": 512, "model_type": "gemma3_text",
      "num_attention_heads": 4, "num_hidden_layers": 3, "num_key_value_heads": 2,
      "pad_token_id": 0, "query_pre_attn_scalar": 32, "rms_norm_eps": 1e-06,
      "rope_parameters": {
        "full_attention": {"rope_theta": 1000000.0, "rope_type": "linear", "factor": 8.0},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}
      },
      "sliding_window": 8, "tie_word_embeddings": true, "vocab_size": 300
    }"#;

    #[test]
    fn gemma2_hub_v4() {
        let c = ModelConfig::from_json_str(GEMMA2_9B_V4).unwrap();
        assert_eq!(c.arch, Arch::Gemma2);
        assert_eq!(c.hidden_size, 3584);
        assert_eq!(c.num_hidden_layers, 42);
        assert_eq!(c.num_key_value_heads, 8);
        assert_eq!(c.attn_logit_softcapping, Some(50.0));
        assert_eq!(c.final_logit_softcapping, Some(30.0));
        assert_eq!(c.query_pre_attn_scalar, 256.0);
        assert_eq!(c.eos_token_ids, vec![1]);
        assert_eq!(c.bos_token_id, Some(2));
        assert!(!c.qk_norm);
        assert_eq!(c.layers.len(), 42);
        for (i, l) in c.layers.iter().enumerate() {
            assert_eq!(l.is_sliding, i % 2 == 0, "layer {i}");
            assert_eq!(l.window, (i % 2 == 0).then_some(4096));
            assert_eq!(l.rope_base, 10_000.0);
            assert_eq!(l.rope_linear_factor, 1.0);
        }
    }

    #[test]
    fn gemma2_v5_layer_types_override_parity() {
        let c = ModelConfig::from_json_str(GEMMA2_V5).unwrap();
        let sliding: Vec<bool> = c.layers.iter().map(|l| l.is_sliding).collect();
        assert_eq!(sliding, vec![true, false, false, true]);
        assert_eq!(c.layers[3].window, Some(8));
        assert_eq!(c.layers[1].window, None);
        assert_eq!(c.query_pre_attn_scalar, 24.0);
        assert!(c.layers.iter().all(|l| l.rope_base == 10_000.0));
    }

    #[test]
    fn gemma2_absent_softcaps_default_on_but_null_turns_them_off() {
        let absent = r#"{"model_type": "gemma2", "num_hidden_layers": 2}"#;
        let c = ModelConfig::from_json_str(absent).unwrap();
        assert_eq!(c.attn_logit_softcapping, Some(50.0));
        assert_eq!(c.final_logit_softcapping, Some(30.0));
        let null = r#"{"model_type": "gemma2", "num_hidden_layers": 2,
            "attn_logit_softcapping": null, "final_logit_softcapping": null}"#;
        let c = ModelConfig::from_json_str(null).unwrap();
        assert_eq!(c.attn_logit_softcapping, None);
        assert_eq!(c.final_logit_softcapping, None);
    }

    #[test]
    fn gemma3_multimodal_v4_nested_text_config() {
        let c = ModelConfig::from_json_str(GEMMA3_4B_V4).unwrap();
        assert_eq!(c.arch, Arch::Gemma3);
        assert_eq!(c.hidden_size, 2560);
        assert_eq!(c.num_hidden_layers, 34);
        // Class defaults of Gemma3TextConfig fill what the hub file leaves out.
        assert_eq!(c.num_attention_heads, 8);
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 256);
        assert_eq!(c.vocab_size, 262_208);
        assert_eq!(c.attn_logit_softcapping, None);
        assert_eq!(c.final_logit_softcapping, None);
        assert_eq!(c.eos_token_ids, vec![1, 106]);
        assert!(c.qk_norm);
        for (i, l) in c.layers.iter().enumerate() {
            let global = (i + 1) % 6 == 0;
            assert_eq!(l.is_sliding, !global, "layer {i}");
            if global {
                assert_eq!((l.rope_base, l.rope_linear_factor), (1_000_000.0, 8.0));
                assert_eq!(l.window, None);
            } else {
                assert_eq!((l.rope_base, l.rope_linear_factor), (10_000.0, 1.0));
                assert_eq!(l.window, Some(1024));
            }
        }
    }

    #[test]
    fn gemma3_text_v4() {
        let c = ModelConfig::from_json_str(GEMMA3_1B_V4).unwrap();
        assert_eq!(c.vocab_size, 262_144);
        assert_eq!(c.num_key_value_heads, 1);
        let globals: Vec<usize> = (0..26).filter(|&i| !c.layers[i].is_sliding).collect();
        assert_eq!(globals, vec![5, 11, 17, 23]);
        assert_eq!(c.layers[5].rope_base, 1_000_000.0);
        assert_eq!(c.layers[5].rope_linear_factor, 1.0);
        assert_eq!(c.layers[0].rope_base, 10_000.0);
        assert_eq!(c.layers[0].window, Some(512));
    }

    #[test]
    fn gemma3_private_pattern_key() {
        let j = r#"{"model_type": "gemma3_text", "num_hidden_layers": 4,
            "_sliding_window_pattern": 2}"#;
        let c = ModelConfig::from_json_str(j).unwrap();
        let sliding: Vec<bool> = c.layers.iter().map(|l| l.is_sliding).collect();
        assert_eq!(sliding, vec![true, false, true, false]);
    }

    #[test]
    fn gemma3_v5_rope_by_layer_type() {
        let c = ModelConfig::from_json_str(GEMMA3_V5).unwrap();
        let l: Vec<(bool, f64, f64, Option<usize>)> = c
            .layers
            .iter()
            .map(|l| (l.is_sliding, l.rope_base, l.rope_linear_factor, l.window))
            .collect();
        assert_eq!(
            l,
            vec![
                (true, 10_000.0, 1.0, Some(8)),
                (false, 1_000_000.0, 8.0, None),
                (true, 10_000.0, 1.0, Some(8)),
            ]
        );
        assert_eq!(c.query_pre_attn_scalar, 32.0);
    }

    #[test]
    fn gemma3_v5_flat_rope_parameters() {
        let j = r#"{"model_type": "gemma3_text", "num_hidden_layers": 2,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_local_base_freq": 5000.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}}"#;
        let c = ModelConfig::from_json_str(j).unwrap();
        assert_eq!(c.layers[0].rope_base, 5000.0);
        assert_eq!(c.layers[1].rope_base, 20000.0);
    }

    #[test]
    fn rejects_unknown_architecture() {
        let e = ModelConfig::from_json_str(r#"{"model_type": "llama"}"#).unwrap_err();
        assert!(matches!(e, ConfigError::UnknownArchitecture { .. }), "{e}");
        assert!(e.to_string().contains("llama"));
        let e =
            ModelConfig::from_json_str(r#"{"architectures": ["MistralForCausalLM"]}"#).unwrap_err();
        assert!(e.to_string().contains("MistralForCausalLM"), "{e}");
    }

    #[test]
    fn rejects_bad_values() {
        for (j, needle) in [
            (
                r#"{"model_type": "gemma2", "num_attention_heads": 6, "num_key_value_heads": 4}"#,
                "multiple",
            ),
            (
                r#"{"model_type": "gemma2", "hidden_activation": "silu"}"#,
                "silu",
            ),
            (
                r#"{"model_type": "gemma3_text", "num_hidden_layers": 2,
                   "layer_types": ["full_attention"]}"#,
                "layer_types",
            ),
            (
                r#"{"model_type": "gemma3_text", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}"#,
                "yarn",
            ),
            (
                r#"{"model_type": "gemma3_text", "num_hidden_layers": 1,
                   "layer_types": ["chunked_attention"]}"#,
                "chunked_attention",
            ),
        ] {
            let e = ModelConfig::from_json_str(j).unwrap_err();
            assert!(e.to_string().contains(needle), "{j}: {e}");
        }
    }

    /// The `quantization_config` of unsloth/gemma-2-9b-it-bnb-4bit (transformers 4.44).
    const BNB_4BIT: &str = r#"{
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": true,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    }"#;

    #[test]
    fn bitsandbytes_4bit_quantization_config() {
        let plain = ModelConfig::from_json_str(GEMMA2_9B_V4).unwrap();
        assert_eq!(plain.quantization, None);
        let with = |q: &str| {
            let mut v: Value = serde_json::from_str(GEMMA2_9B_V4).unwrap();
            v["quantization_config"] = serde_json::from_str(q).unwrap();
            ModelConfig::from_json_str(&v.to_string())
        };
        assert_eq!(
            with(BNB_4BIT).unwrap().quantization,
            Some(Quantization::BitsAndBytesNf4)
        );
        // Multimodal Gemma-3 keeps it on the wrapper.
        let mm = format!(
            r#"{{"model_type": "gemma3", "text_config": {{"model_type": "gemma3_text"}},
                "quantization_config": {BNB_4BIT}}}"#
        );
        assert_eq!(
            ModelConfig::from_json_str(&mm).unwrap().quantization,
            Some(Quantization::BitsAndBytesNf4)
        );
        let edit = |k: &str, v: Value| {
            let mut q: Value = serde_json::from_str(BNB_4BIT).unwrap();
            q[k] = v;
            q.to_string()
        };
        for (q, needle) in [
            (r#"{"quant_method": "gptq", "bits": 4}"#.to_string(), "gptq"),
            (edit("bnb_4bit_quant_type", "fp4".into()), "fp4"),
            (
                edit("bnb_4bit_use_double_quant", false.into()),
                "double_quant",
            ),
            (
                edit("bnb_4bit_quant_storage", "bfloat16".into()),
                "bfloat16",
            ),
            (
                edit("load_in_8bit", true.into())
                    .replace(r#""load_in_4bit":true"#, r#""load_in_4bit":false"#),
                "8-bit",
            ),
        ] {
            let e = with(&q).unwrap_err();
            assert!(
                matches!(e, ConfigError::UnsupportedQuantization(_)),
                "{e:?}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains(needle) && msg.contains("bnb-4bit"),
                "{q}: {msg}"
            );
        }
    }
}
