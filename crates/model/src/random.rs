//! Random Gemma models (`--model random:<preset>`): the shapes of real checkpoints with seeded
//! random weights, so a benchmark or a smoke run on a 9B-shaped model needs nothing downloaded.
//!
//! [`RandomSource`] is a [`TensorSource`]: [`crate::build_gemma`] loads it as it loads any
//! checkpoint. Each projection comes back from [`TensorSource::load_prequantized`] already in
//! NF4 (random 4-bit codes, per-block absmax around the value that gives the weights a standard
//! deviation of [`WEIGHT_STD`], double-quantized with the bitsandbytes codec), generated when
//! the loader asks for it: one projection at a time, so the host holds little more than the
//! NF4 bytes of the model (the f32 embedding aside, which the loader reads as f32 from any
//! source). The embedding and the norm weights come from [`TensorSource::load_f32`], uniform
//! with the same standard deviation.
//!
//! Every value is a pure function of the seed, the tensor's name and the element's index
//! (SplitMix64's output function over a counter), so the same seed gives the same model
//! whatever order the loader asks in and however many threads generate it.
//!
//! The tokenizer ([`RandomModel::tokenizer`]) is the project's own [`Tokenizer`] over a
//! synthetic vocabulary of the preset's size: Gemma's special tokens at Gemma's ids
//! (`<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3, `<mask>` 4, `<start_of_turn>` /
//! `<end_of_turn>` at 106/107 for Gemma-2 and 105/106 for Gemma-3), the 256 byte-fallback
//! tokens, Bengali letters, runs of `▁`, then ASCII n-grams to fill the vocabulary, so chat
//! prompts encode to a realistic number of tokens and every id decodes.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use rupantor_quant::nf4::{NestedAbsmax, BLOCKSIZE, NF4_CODE};
use rupantor_quant::{Nf4Tensor, SourceDtype};

use crate::config::{Arch, ModelConfig, Quantization};
use crate::loader::{LoadError, TensorSource};
use crate::tokenizer::{GgufVocab, Tokenizer, TokenizerError, END_OF_TURN, START_OF_TURN};

/// The `--model` prefix of a random model: `random:<preset>` or `random:<preset>@<seed>`.
pub const PREFIX: &str = "random:";
/// The seed of `random:<preset>` without `@<seed>`.
pub const DEFAULT_SEED: u64 = 0;
/// Standard deviation of every random weight (the projections' dequantized values, the
/// embedding and the norm weights): HF's `initializer_range` for Gemma.
pub const WEIGHT_STD: f32 = 0.02;
/// Relative spread of the per-block absmax around its mean, so the double-quantized absmax
/// codes are not all the same value.
const ABSMAX_SPREAD: f32 = 0.25;

/// A built-in model shape.
#[derive(Debug)]
pub struct Preset {
    pub name: &'static str,
    /// The checkpoint whose shape it copies.
    pub like: &'static str,
    /// Its `config.json`, as the hub has it (transformers 4.x dialect).
    config_json: &'static str,
}

/// The presets, by name.
pub const PRESETS: [Preset; 3] = [
    Preset {
        name: "gemma2-9b",
        like: "google/gemma-2-9b-it",
        config_json: r#"{
          "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
          "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
          "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
          "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584,
          "intermediate_size": 14336, "max_position_embeddings": 8192,
          "num_attention_heads": 16, "num_hidden_layers": 42, "num_key_value_heads": 8,
          "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
          "sliding_window": 4096, "tie_word_embeddings": true, "vocab_size": 256000
        }"#,
    },
    Preset {
        name: "gemma2-2b",
        like: "google/gemma-2-2b-it",
        config_json: r#"{
          "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
          "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
          "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
          "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
          "intermediate_size": 9216, "max_position_embeddings": 8192,
          "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4,
          "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
          "sliding_window": 4096, "tie_word_embeddings": true, "vocab_size": 256000
        }"#,
    },
    Preset {
        name: "gemma3-270m",
        like: "google/gemma-3-270m-it (the embedded GGUF's config)",
        config_json: r#"{
          "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
          "attn_logit_softcapping": null, "final_logit_softcapping": null,
          "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0,
          "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640,
          "intermediate_size": 2048, "max_position_embeddings": 32768,
          "num_attention_heads": 4, "num_hidden_layers": 18, "num_key_value_heads": 1,
          "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
          "rope_local_base_freq": 10000.0, "rope_scaling": null, "rope_theta": 1000000.0,
          "sliding_window": 512, "sliding_window_pattern": 6,
          "tie_word_embeddings": true, "vocab_size": 262144
        }"#,
    },
];

#[derive(Debug, thiserror::Error)]
pub enum RandomError {
    #[error("unknown random model `{PREFIX}{name}` (presets: {})", preset_names())]
    UnknownPreset { name: String },
    #[error("`{PREFIX}{spec}`: the seed after `@` must be an unsigned integer")]
    BadSeed { spec: String },
}

/// `gemma2-9b, gemma2-2b, gemma3-270m`.
pub fn preset_names() -> String {
    PRESETS
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The preset called `name`; the error lists the presets.
pub fn preset(name: &str) -> Result<&'static Preset, RandomError> {
    PRESETS
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| RandomError::UnknownPreset {
            name: name.to_string(),
        })
}

impl Preset {
    /// The resolved config (the JSON above, through the same resolver as a checkpoint's).
    pub fn config(&self) -> ModelConfig {
        ModelConfig::from_json_str(self.config_json)
            .unwrap_or_else(|e| panic!("built-in preset {}: {e}", self.name))
    }
}

/// A preset with a seed: what `--model random:<preset>[@<seed>]` names.
#[derive(Debug, Clone, Copy)]
pub struct RandomModel {
    pub preset: &'static Preset,
    pub seed: u64,
}

impl RandomModel {
    /// Parses the part after [`PREFIX`]: `<preset>` (seed [`DEFAULT_SEED`]) or
    /// `<preset>@<seed>`.
    pub fn parse(spec: &str) -> Result<Self, RandomError> {
        let (name, seed) = match spec.split_once('@') {
            Some((name, seed)) => (
                name,
                seed.parse().map_err(|_| RandomError::BadSeed {
                    spec: spec.to_string(),
                })?,
            ),
            None => (spec, DEFAULT_SEED),
        };
        Ok(Self {
            preset: preset(name)?,
            seed,
        })
    }

    /// `random:<preset>@<seed>`, for messages and reports.
    pub fn label(&self) -> String {
        format!("{PREFIX}{}@{}", self.preset.name, self.seed)
    }

    pub fn config(&self) -> ModelConfig {
        self.preset.config()
    }

    /// The weights, for [`crate::build_gemma`].
    pub fn source(&self) -> RandomSource {
        RandomSource::new(&self.config(), self.seed, self.label())
    }

    /// A tokenizer whose vocabulary has the preset's size (see the module docs).
    pub fn tokenizer(&self) -> Result<Tokenizer, TokenizerError> {
        tokenizer_for(&self.config())
    }
}

/// What a tensor name stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A projection: random NF4.
    Linear,
    /// The embedding or a norm weight: uniform f32.
    Dense,
}

/// Seeded random weights for every tensor a [`ModelConfig`] needs, addressed by HF names.
#[derive(Debug, Clone)]
pub struct RandomSource {
    label: String,
    seed: u64,
    tensors: HashMap<String, (Vec<usize>, Kind)>,
}

impl RandomSource {
    /// The tensors of `cfg` (tied lm_head, as every Gemma; q/k norms when `cfg.qk_norm`);
    /// `label` names the source in errors.
    pub fn new(cfg: &ModelConfig, seed: u64, label: impl Into<String>) -> Self {
        let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let q_out = cfg.num_attention_heads * hd;
        let kv_out = cfg.num_key_value_heads * hd;
        let mut tensors = HashMap::new();
        let mut add = |name: String, shape: Vec<usize>, kind| {
            tensors.insert(name, (shape, kind));
        };
        add(
            "model.embed_tokens.weight".into(),
            vec![cfg.vocab_size, h],
            Kind::Dense,
        );
        add("model.norm.weight".into(), vec![h], Kind::Dense);
        if !cfg.tie_word_embeddings {
            add(
                "lm_head.weight".into(),
                vec![cfg.vocab_size, h],
                Kind::Dense,
            );
        }
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}.");
            for (n, shape) in [
                ("self_attn.q_proj", [q_out, h]),
                ("self_attn.k_proj", [kv_out, h]),
                ("self_attn.v_proj", [kv_out, h]),
                ("self_attn.o_proj", [h, q_out]),
                ("mlp.gate_proj", [inter, h]),
                ("mlp.up_proj", [inter, h]),
                ("mlp.down_proj", [h, inter]),
            ] {
                add(format!("{p}{n}.weight"), shape.to_vec(), Kind::Linear);
            }
            for n in [
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            ] {
                add(format!("{p}{n}.weight"), vec![h], Kind::Dense);
            }
            if cfg.qk_norm {
                for n in ["q_norm", "k_norm"] {
                    add(format!("{p}self_attn.{n}.weight"), vec![hd], Kind::Dense);
                }
            }
        }
        Self {
            label: label.into(),
            seed,
            tensors,
        }
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The stream key of tensor `name`.
    fn key(&self, name: &str) -> u64 {
        mix64(self.seed ^ fnv1a(name.as_bytes()))
    }

    /// Shape and kind of `name`, checked against `expected`.
    fn lookup(&self, name: &str, expected: &[usize]) -> Result<Kind, LoadError> {
        let (shape, kind) = self.tensors.get(name).ok_or_else(|| self.missing(name))?;
        if shape != expected {
            return Err(LoadError::ShapeMismatch {
                name: name.to_string(),
                file: PathBuf::from(&self.label),
                expected: expected.to_vec(),
                found: shape.clone(),
            });
        }
        Ok(*kind)
    }
}

impl TensorSource for RandomSource {
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Projections as their NF4 values dequantized (what a dense builder would get from
    /// [`TensorSource::load_prequantized`] too), the rest uniform.
    fn load_f32(&self, name: &str, expected: &[usize]) -> Result<Tensor, LoadError> {
        let key = self.key(name);
        let data = match self.lookup(name, expected)? {
            Kind::Linear => random_nf4(expected, key, WEIGHT_STD).dequantize(),
            Kind::Dense => random_uniform(expected.iter().product(), key, WEIGHT_STD),
        };
        Tensor::from_vec(data, expected, &Device::Cpu).map_err(|source| LoadError::Build {
            name: name.to_string(),
            source,
        })
    }

    fn missing(&self, name: &str) -> LoadError {
        LoadError::MissingTensor {
            name: name.to_string(),
            searched: vec![PathBuf::from(&self.label)],
        }
    }

    /// Every projection, as random NF4; `None` for the rest (read through `load_f32`).
    fn load_prequantized(
        &self,
        name: &str,
        expected: &[usize],
        _declared: Option<Quantization>,
    ) -> Result<Option<Nf4Tensor>, LoadError> {
        match self.tensors.get(name) {
            Some((_, Kind::Linear)) => {
                self.lookup(name, expected)?;
                Ok(Some(random_nf4(expected, self.key(name), WEIGHT_STD)))
            }
            _ => Ok(None),
        }
    }
}

/// SplitMix64's output function: a bijective mix of 64 bits.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `i`-th value of stream `key` (SplitMix64 seeded with `key`, read at position `i`).
#[inline]
fn stream(key: u64, i: u64) -> u64 {
    mix64(key.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
}

/// 64-bit FNV-1a.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Fills `out` with `f(index of the chunk's first element, chunk)` on all cores; chunks start
/// at multiples of `align` so a generator that works in groups (two values per draw) sees whole
/// groups. Each element depends only on its index, so the result does not depend on the split.
fn fill_parallel<T: Send>(out: &mut [T], align: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    const MIN_PER_THREAD: usize = 1 << 16;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(out.len().div_ceil(MIN_PER_THREAD))
        .max(1);
    let per = out.len().div_ceil(threads).div_ceil(align).max(1) * align;
    if threads == 1 {
        f(0, out);
        return;
    }
    std::thread::scope(|s| {
        for (k, chunk) in out.chunks_mut(per).enumerate() {
            let f = &f;
            s.spawn(move || f(k * per, chunk));
        }
    });
}

/// A uniform value in `[-1, 1)` from 24 random bits.
#[inline]
fn signed_unit(bits24: u64) -> f32 {
    (bits24 as f32) * (2.0 / (1u64 << 24) as f32) - 1.0
}

/// `n` values uniform in `[-a, a)` with standard deviation `std` (`a = std * sqrt(3)`), two per
/// draw of stream `key`.
pub fn random_uniform(n: usize, key: u64, std: f32) -> Vec<f32> {
    let a = std * 3f32.sqrt();
    let mut out = vec![0f32; n];
    fill_parallel(&mut out, 2, |start, chunk| {
        for (j, pair) in chunk.chunks_mut(2).enumerate() {
            let r = stream(key, ((start / 2) + j) as u64);
            pair[0] = a * signed_unit(r >> 40);
            if let Some(v) = pair.get_mut(1) {
                *v = a * signed_unit((r >> 8) & 0xFF_FFFF);
            }
        }
    });
    out
}

/// Root mean square of the NF4 code values: the standard deviation (about the code mean) of a
/// weight whose codes are uniform, per unit of absmax.
fn nf4_code_std() -> f32 {
    let mean = NF4_CODE.iter().sum::<f32>() / 16.0;
    (NF4_CODE
        .iter()
        .map(|c| (c - mean) * (c - mean))
        .sum::<f32>()
        / 16.0)
        .sqrt()
}

/// A random NF4 tensor of `shape` whose dequantized values have standard deviation `std`:
/// uniform random 4-bit codes (8 bytes per draw of stream `key`), and per 64-element block an
/// absmax of `m * (1 + 0.25 u)` with `u` uniform in `[-1, 1)` (drawn from the stream `key + 1`)
/// and `m` chosen for `std`; the absmax is double-quantized as bitsandbytes does.
pub fn random_nf4(shape: &[usize], key: u64, std: f32) -> Nf4Tensor {
    let n: usize = shape.iter().product();
    let mut packed = vec![0u8; n.div_ceil(2)];
    fill_parallel(&mut packed, 8, |start, chunk| {
        for (j, bytes) in chunk.chunks_mut(8).enumerate() {
            let r = stream(key, ((start / 8) + j) as u64).to_le_bytes();
            bytes.copy_from_slice(&r[..bytes.len()]);
        }
    });
    if n % 2 == 1 {
        // bitsandbytes pads an odd count with a zero, whose code is 7.
        let last = packed.last_mut().expect("n is odd, so at least one byte");
        *last = (*last & 0xF0) | 7;
    }
    // E[(1 + s u)^2] = 1 + s^2 / 3 for u uniform in [-1, 1).
    let spread_rms = (1.0 + ABSMAX_SPREAD * ABSMAX_SPREAD / 3.0).sqrt();
    let m = std / (nf4_code_std() * spread_rms);
    let absmax_key = mix64(key.wrapping_add(1));
    let absmax: Vec<f32> = (0..n.div_ceil(BLOCKSIZE))
        .map(|b| {
            let u = signed_unit(stream(absmax_key, b as u64) >> 40);
            m * (1.0 + ABSMAX_SPREAD * u)
        })
        .collect();
    Nf4Tensor {
        packed,
        absmax: NestedAbsmax::quantize(&absmax),
        shape: shape.to_vec(),
        dtype: SourceDtype::Bf16,
    }
}

/// Characters the synthetic vocabulary builds its n-grams from.
const ALPHABET: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\
                        _()[]{}.,:;=+-*/<>'\"#!?%&|";

/// The synthetic tokenizer of a model with `cfg`'s vocabulary size and family (see the module
/// docs for the layout).
pub fn tokenizer_for(cfg: &ModelConfig) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_gguf_vocab(synthetic_vocab(cfg))
}

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

/// A vocabulary under construction.
struct VocabBuilder {
    tokens: Vec<String>,
    types: Vec<i32>,
    unused: usize,
}

impl VocabBuilder {
    fn push(&mut self, token: String, ty: i32) {
        self.tokens.push(token);
        self.types.push(ty);
    }

    /// `<unusedN>` control tokens up to (not including) id `to`.
    fn unused_to(&mut self, to: usize) {
        while self.tokens.len() < to {
            let t = format!("<unused{}>", self.unused);
            self.unused += 1;
            self.push(t, CONTROL);
        }
    }
}

/// The vocabulary [`tokenizer_for`] builds.
fn synthetic_vocab(cfg: &ModelConfig) -> GgufVocab {
    let n = cfg.vocab_size;
    // Gemma-2 puts <start_of_turn> at 106 and the bytes at 217; Gemma-3 at 105 and 238.
    let (start_of_turn, first_byte) = match cfg.arch {
        Arch::Gemma2 => (106, 217),
        Arch::Gemma3 => (105, 238),
    };
    let mut v = VocabBuilder {
        tokens: Vec::with_capacity(n),
        types: Vec::with_capacity(n),
        unused: 0,
    };
    for t in ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] {
        v.push(t.into(), if t == "<unk>" { UNKNOWN } else { CONTROL });
    }
    v.unused_to(start_of_turn);
    v.push(START_OF_TURN.into(), CONTROL);
    v.push(END_OF_TURN.into(), CONTROL);
    for t in ["\n", "\n\n", "\t"] {
        v.push(t.into(), USER_DEFINED);
    }
    v.unused_to(first_byte);
    for b in 0..=255u8 {
        v.push(format!("<0x{b:02X}>"), BYTE);
    }
    for run in 1..=16 {
        v.push("\u{2581}".repeat(run), NORMAL);
    }
    // Bengali letters and signs (U+0980..U+09FF), alone and after a space.
    for c in (0x0980u32..0x0A00).filter_map(char::from_u32) {
        v.push(c.to_string(), NORMAL);
        v.push(format!("\u{2581}{c}"), NORMAL);
    }
    // ASCII n-grams, each alone and after a space, shortest first, until the vocabulary is full.
    let alphabet: Vec<char> = ALPHABET.chars().collect();
    let mut grams: Vec<String> = vec![String::new()];
    'fill: loop {
        let mut next = Vec::with_capacity(grams.len() * alphabet.len());
        for g in &grams {
            for c in &alphabet {
                let t = format!("{g}{c}");
                for spelled in [format!("\u{2581}{t}"), t.clone()] {
                    if v.tokens.len() >= n {
                        break 'fill;
                    }
                    v.push(spelled, NORMAL);
                }
                next.push(t);
            }
        }
        grams = next;
    }
    v.tokens.truncate(n);
    v.types.truncate(n);
    GgufVocab {
        model: "llama".into(),
        tokens: v.tokens,
        scores: Vec::new(),
        types: v.types,
        bos: Some(2),
        eos: Some(1),
        pad: Some(0),
        unk: Some(3),
        eot: Some(start_of_turn as u32 + 1),
        add_bos: Some(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::LinearRole;
    use crate::loader::build_gemma;
    use crate::qlora::QLoraBuilder;
    use crate::tokenizer::chat_prompt;

    fn mean_std(x: &[f32]) -> (f64, f64) {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = x
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        (mean, var.sqrt())
    }

    /// A small Gemma-2 / Gemma-3 shape (4 layers, hidden 64).
    fn tiny(arch: &str) -> ModelConfig {
        let extra = if arch == "gemma2" {
            r#""attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0"#
        } else {
            r#""sliding_window_pattern": 2"#
        };
        ModelConfig::from_json_str(&format!(
            r#"{{"model_type": "{arch}", "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
               "vocab_size": 1024, "bos_token_id": 2, "eos_token_id": 1, {extra}}}"#
        ))
        .unwrap()
    }

    fn build(cfg: &ModelConfig, seed: u64) -> crate::Gemma {
        let source = RandomSource::new(cfg, seed, "random:test");
        let mut builder = QLoraBuilder::new(&Device::Cpu);
        builder.targets.clear();
        build_gemma(cfg.clone(), &source, &Device::Cpu, &mut builder).unwrap()
    }

    fn logits(model: &crate::Gemma, ids: &[u32]) -> Vec<f32> {
        let ids = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
        model
            .forward(&ids, 0, None, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn presets_have_the_checkpoints_shapes() {
        let c = preset("gemma2-9b").unwrap().config();
        assert_eq!(c.arch, Arch::Gemma2);
        assert_eq!(
            (
                c.hidden_size,
                c.num_hidden_layers,
                c.intermediate_size,
                c.vocab_size
            ),
            (3584, 42, 14336, 256_000)
        );
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (16, 8, 256)
        );
        assert_eq!(
            (c.attn_logit_softcapping, c.final_logit_softcapping),
            (Some(50.0), Some(30.0))
        );
        assert_eq!((c.query_pre_attn_scalar, c.sliding_window), (256.0, 4096));
        assert!(c.tie_word_embeddings && !c.qk_norm);
        // Gemma-2 alternates sliding (even) and global (odd) layers.
        assert!(c
            .layers
            .iter()
            .enumerate()
            .all(|(i, l)| l.is_sliding == (i % 2 == 0)));

        let c = preset("gemma2-2b").unwrap().config();
        assert_eq!(
            (
                c.hidden_size,
                c.num_hidden_layers,
                c.intermediate_size,
                c.vocab_size
            ),
            (2304, 26, 9216, 256_000)
        );
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (8, 4, 256)
        );

        let c = preset("gemma3-270m").unwrap().config();
        assert_eq!(c.arch, Arch::Gemma3);
        assert_eq!(
            (
                c.hidden_size,
                c.num_hidden_layers,
                c.intermediate_size,
                c.vocab_size
            ),
            (640, 18, 2048, 262_144)
        );
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (4, 1, 256)
        );
        assert!(c.qk_norm && c.tie_word_embeddings);
        assert_eq!(c.final_logit_softcapping, None);
        for (i, l) in c.layers.iter().enumerate() {
            let global = i % 6 == 5;
            assert_eq!(l.is_sliding, !global, "layer {i}");
            let (base, window) = if global {
                (1_000_000.0, None)
            } else {
                (10_000.0, Some(512))
            };
            assert_eq!((l.rope_base, l.window), (base, window), "layer {i}");
        }
    }

    #[test]
    fn unknown_presets_and_bad_seeds_are_named() {
        let e = preset("gemma7").unwrap_err().to_string();
        assert!(e.contains("random:gemma7"), "{e}");
        for p in &PRESETS {
            assert!(e.contains(p.name), "{e}");
        }
        let e = RandomModel::parse("gemma2-9b@x").unwrap_err().to_string();
        assert!(e.contains("seed"), "{e}");
        let m = RandomModel::parse("gemma2-2b@7").unwrap();
        assert_eq!((m.preset.name, m.seed), ("gemma2-2b", 7));
        assert_eq!(m.label(), "random:gemma2-2b@7");
        assert_eq!(
            RandomModel::parse("gemma3-270m").unwrap().seed,
            DEFAULT_SEED
        );
    }

    #[test]
    fn nf4_weights_have_the_requested_statistics() {
        let w = random_nf4(&[512, 1024], 11, WEIGHT_STD);
        assert_eq!(w.shape, [512, 1024]);
        assert_eq!(w.packed.len(), 512 * 1024 / 2);
        assert_eq!(w.absmax.codes.len(), 512 * 1024 / BLOCKSIZE);
        let v = w.dequantize();
        let (mean, std) = mean_std(&v);
        assert!((std - 0.02).abs() < 0.001, "std {std}");
        assert!(mean.abs() < 0.002, "mean {mean}");
        // All 16 codes occur, in both nibbles, about equally often.
        let mut counts = [0usize; 16];
        for b in &w.packed {
            counts[usize::from(b >> 4)] += 1;
            counts[usize::from(b & 15)] += 1;
        }
        let expect = w.numel() / 16;
        assert!(
            counts.iter().all(|&c| c.abs_diff(expect) < expect / 20),
            "{counts:?}"
        );
        // The absmax varies from block to block, within the spread.
        let absmax = w.absmax.dequantize();
        let (lo, hi) = absmax
            .iter()
            .fold((f32::MAX, 0f32), |(l, h), &a| (l.min(a), h.max(a)));
        assert!(hi / lo > 1.5 && hi / lo < 1.75, "absmax {lo}..{hi}");

        assert_eq!(random_nf4(&[512, 1024], 11, WEIGHT_STD), w);
        assert_ne!(random_nf4(&[512, 1024], 12, WEIGHT_STD).packed, w.packed);
        // An odd count is padded with the zero code, as bitsandbytes does.
        let odd = random_nf4(&[3, 5], 1, WEIGHT_STD);
        assert_eq!(odd.packed.len(), 8);
        assert_eq!(odd.packed[7] & 15, 7);
    }

    #[test]
    fn uniform_values_do_not_depend_on_the_thread_split() {
        let n = (1 << 18) + 3;
        let v = random_uniform(n, 5, WEIGHT_STD);
        let (mean, std) = mean_std(&v);
        assert!(
            (std - 0.02).abs() < 0.0005 && mean.abs() < 0.0005,
            "{mean} {std}"
        );
        let bound = WEIGHT_STD * 3f32.sqrt();
        assert!(v.iter().all(|x| x.abs() <= bound));
        // Element i is a function of i alone: a prefix equals a shorter draw.
        assert_eq!(random_uniform(1001, 5, WEIGHT_STD)[..], v[..1001]);
    }

    #[test]
    fn the_source_serves_every_tensor_with_its_shape() {
        let cfg = tiny("gemma3");
        let s = RandomSource::new(&cfg, 3, "random:tiny");
        // Embedding, final norm, then 7 projections, 4 norms and 2 q/k norms per layer.
        assert_eq!(s.len(), 2 + 4 * 13);
        let q = s
            .load_prequantized("model.layers.3.self_attn.q_proj.weight", &[64, 64], None)
            .unwrap()
            .unwrap();
        assert_eq!(q.shape, [64, 64]);
        let dense = s
            .load_f32("model.layers.3.self_attn.q_proj.weight", &[64, 64])
            .unwrap();
        assert_eq!(
            dense.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            q.dequantize()
        );
        assert!(s
            .load_prequantized("model.norm.weight", &[64], None)
            .unwrap()
            .is_none());
        let norm = s
            .load_f32("model.layers.0.self_attn.k_norm.weight", &[16])
            .unwrap();
        assert_eq!(norm.dims(), [16]);

        let e = s
            .load_f32("model.norm.weight", &[65])
            .unwrap_err()
            .to_string();
        assert!(e.contains("random:tiny") && e.contains("[65]"), "{e}");
        let e = s.load_f32("model.layers.4.mlp.up_proj.weight", &[128, 64]);
        assert!(e.unwrap_err().to_string().contains("not found"));
        assert!(!RandomSource::new(&tiny("gemma2"), 3, "t")
            .contains("model.layers.0.self_attn.q_norm.weight"));
    }

    #[test]
    fn same_seed_same_model_and_finite_logits() {
        for arch in ["gemma2", "gemma3"] {
            let cfg = tiny(arch);
            let ids = [2u32, 17, 300, 999, 5, 64];
            let a = logits(&build(&cfg, 9), &ids);
            assert_eq!(a.len(), ids.len() * cfg.vocab_size);
            assert!(a.iter().all(|v| v.is_finite()), "{arch}");
            let (_, std) = mean_std(&a);
            assert!(std > 1e-3, "{arch}: logits are flat ({std})");
            assert_eq!(logits(&build(&cfg, 9), &ids), a, "{arch}");
            assert_ne!(logits(&build(&cfg, 10), &ids), a, "{arch}");
        }
    }

    #[test]
    fn the_270m_preset_loads_and_runs() {
        let m = RandomModel::parse("gemma3-270m").unwrap();
        let cfg = m.config();
        let mut builder = QLoraBuilder::new(&Device::Cpu);
        builder.targets = vec![LinearRole::QProj];
        let model = build_gemma(cfg.clone(), &m.source(), &Device::Cpu, &mut builder).unwrap();
        assert_eq!(model.embed_tokens().dims(), [262_144, 640]);
        assert_eq!(model.trainable_vars().len(), 2 * 18);
        let tok = m.tokenizer().unwrap();
        let ids = tok.encode_chat("একটি ফাংশন লিখুন যা দুটি সংখ্যা যোগ করে।", None);
        let out = logits(&model, &ids);
        assert_eq!(out.len(), ids.len() * 262_144);
        assert!(out.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn the_tokenizer_has_gemmas_specials_and_round_trips() {
        for (name, sot) in [("gemma2-9b", 106u32), ("gemma3-270m", 105)] {
            let m = RandomModel::parse(name).unwrap();
            let tok = m.tokenizer().unwrap();
            assert_eq!(tok.vocab_size(), m.config().vocab_size, "{name}");
            assert_eq!(
                (tok.pad_id(), tok.eos_id(), tok.bos_id(), tok.unk_id()),
                (Some(0), Some(1), Some(2), Some(3))
            );
            assert_eq!(tok.token_to_id(START_OF_TURN), Some(sot));
            assert_eq!(tok.token_to_id(END_OF_TURN), Some(sot + 1));
            assert_eq!(tok.eot_id(), Some(sot + 1));
            assert!(tok.is_special(sot) && tok.is_special(2));

            let text = "def add(a, b):\n    return a + b  # যোগফল 😀";
            let ids = tok.encode(text, false);
            assert!(ids.len() < text.len() / 2, "{name}: {} ids", ids.len());
            assert_eq!(tok.decode(&ids, false), text, "{name}");
            let prompt = chat_prompt("দুটি সংখ্যা যোগ করুন", None);
            let ids = tok.encode_chat("দুটি সংখ্যা যোগ করুন", None);
            assert_eq!(ids[..2], [2, sot]);
            assert_eq!(tok.decode(&ids, false), prompt, "{name}");
            // Every id decodes (a random model emits any of them).
            let all: Vec<u32> = (0..tok.vocab_size() as u32).step_by(997).collect();
            assert!(!tok.decode(&all, true).is_empty());
        }
    }
}
