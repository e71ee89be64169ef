//! `--config FILE`: the TOML presets in `configs/`. Command-line flags override every key.
//!
//! The `[model]`, `[generation]`, `[sandbox]` and `[loop]` tables (`[train]` is
//! `crate::train`'s):
//!
//! ```toml
//! [model]
//! model = "embedded:gemma3-270m"   # M: path, .gguf, org/name, or the embedded alias
//! device = "cpu"                   # cpu | cuda
//! quant = "nf4"                    # nf4 | none
//! dtype = "f32"                    # f32 | bf16
//!
//! [generation]                     # rupantor_pipeline::GenSettings
//! max_new_tokens = 512
//! temperature = 0.0                # 0 = greedy
//! top_p = 1.0
//! seed = 0
//! batch = 4
//! visible_tests = true             # put the visible asserts into the prompt
//! max_visible_tests = 1            # only the first one (as the test split shows)
//!
//! [sandbox]                        # rupantor_pipeline::VerifySettings
//! timeout_s = 10.0
//! memory_mb = 2048
//! workers = 0                      # 0: the cores available
//!
//! [loop]
//! iterations = 2                   # `train --iter N`; absent: one training run
//!
//! [strategies]                     # rupantor_pipeline::Strategies (generate)
//! fewshot = 0
//! repair = 0
//! review = false
//! translate = false
//! ```
//!
//! Unknown tables and keys are errors (a typo must not silently fall back to a default).
//! Relative model paths are taken from the working directory, as on the command line.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

use rupantor_pipeline::{GenSettings, Strategies, VerifySettings};

use crate::model_arg::{DType, DeviceKind, ModelArgs, ModelSettings, Quant};

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    #[serde(default)]
    pub model: ModelTable,
    /// Every key has a default, so a table sets only what it changes.
    #[serde(default)]
    pub generation: GenSettings,
    #[serde(default)]
    pub sandbox: VerifySettings,
    #[serde(default, rename = "loop")]
    pub self_improve: LoopTable,
    /// `generate`'s inference strategies (design §7); all off by default.
    #[serde(default)]
    pub strategies: Strategies,
    /// `rupantor train`'s keys (`rupantor_train::TrainConfig` fields), checked by
    /// `crate::train::train_table`.
    #[serde(default)]
    pub train: Option<toml::Table>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelTable {
    pub model: Option<String>,
    pub device: Option<DeviceKind>,
    pub quant: Option<Quant>,
    pub dtype: Option<DType>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoopTable {
    /// Iterations of the self-improvement loop (`--iter`).
    pub iterations: Option<usize>,
}

impl RunConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("config {}", path.display()))
    }

    pub fn from_toml(text: &str) -> Result<Self> {
        Ok(toml::from_str(text)?)
    }

    /// `--config FILE` if given, else the empty config (all defaults).
    pub fn load(path: Option<&Path>) -> Result<Self> {
        path.map_or_else(|| Ok(Self::default()), Self::from_file)
    }

    /// Flags over the `[model]` table over the defaults.
    pub fn model_settings(&self, flags: &ModelArgs) -> ModelSettings {
        let d = ModelSettings::default();
        let m = &self.model;
        let device = flags.device.or(m.device).unwrap_or(d.device);
        ModelSettings {
            model: flags
                .model
                .clone()
                .or_else(|| m.model.clone())
                .unwrap_or(d.model),
            device,
            quant: flags.quant.or(m.quant).unwrap_or(d.quant),
            dtype: flags
                .dtype
                .or(m.dtype)
                .unwrap_or_else(|| DType::default_for(device)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let cfg = RunConfig::from_toml(
            "[model]\nmodel = \"google/gemma-2-9b-it\"\nquant = \"none\"\n\
             [generation]\nbatch = 2\n",
        )
        .unwrap();
        assert_eq!(cfg.generation.batch, 2);
        assert_eq!(
            cfg.generation.max_new_tokens,
            GenSettings::default().max_new_tokens,
            "keys left out keep their defaults"
        );
        let s = cfg.model_settings(&ModelArgs::default());
        assert_eq!(s.model, "google/gemma-2-9b-it");
        assert_eq!(s.quant, Quant::None);
        assert_eq!(s.device, DeviceKind::Cpu);
        let flags = ModelArgs {
            model: Some("x.gguf".into()),
            quant: Some(Quant::Nf4),
            ..ModelArgs::default()
        };
        let s = cfg.model_settings(&flags);
        assert_eq!((s.model.as_str(), s.quant), ("x.gguf", Quant::Nf4));
        assert_eq!(
            RunConfig::default().model_settings(&ModelArgs::default()),
            ModelSettings::default()
        );
    }

    #[test]
    fn typos_are_errors() {
        assert!(RunConfig::from_toml("[model]\nquant = \"nf5\"\n").is_err());
        assert!(RunConfig::from_toml("[model]\nmodle = \"x\"\n").is_err());
        assert!(RunConfig::from_toml("[generaton]\nbatch = 1\n").is_err());
    }

    #[test]
    fn shipped_presets_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        for name in ["gemma3-270m-cpu.toml", "gemma2-9b-it.toml"] {
            let cfg = RunConfig::from_file(&dir.join(name)).unwrap();
            assert!(cfg.model.model.is_some(), "{name}");
        }
        let nine = RunConfig::from_file(&dir.join("gemma2-9b-it.toml")).unwrap();
        assert_eq!(nine.model.model.as_deref(), Some("google/gemma-2-9b-it"));
        assert_eq!(nine.model.device, Some(DeviceKind::Cuda));
        assert_eq!(nine.model.dtype, Some(DType::Bf16));
    }
}
