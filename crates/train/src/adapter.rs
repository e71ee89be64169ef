//! LoRA adapters in Hugging Face PEFT's on-disk format (design §5), both ways.
//!
//! A directory holds `adapter_config.json` and `adapter_model.safetensors`:
//!
//! * the config carries every field PEFT 0.21's `LoraConfig.save_pretrained` writes, with
//!   PEFT's defaults for those rupantor has no use for, sorted and indented as PEFT writes them
//!   (`json.dumps(indent=2, sort_keys=True)`). PEFT itself needs only `peft_type` to load one
//!   (`MIN_EXPECTED_CONFIG_KEYS`); the rest fall back to its defaults.
//! * the weights are `base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight`
//!   and `...mlp.{gate,up,down}_proj...`, A `[r, in]` and B `[out, r]`, stored in f32 with
//!   PEFT's `{"format": "pt"}` metadata.
//!
//! Reading is stricter than writing is general: a LoRA config this model cannot honour (DoRA,
//! trained biases, per-module rank or alpha patterns, `modules_to_save`, a restricted layer set,
//! `fan_in_fan_out`) is refused by name instead of being silently mis-applied. Weights may be
//! F32, BF16 or F16; a missing, surplus or mis-shaped tensor is an error naming the file, the
//! key and the shape expected. Both files are written atomically (temporary file + rename).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Tensor, Var};
use rupantor_model::linear::LinearRole;
use rupantor_model::{LoraConfig, NamedAdapter};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Map, Value};

use crate::fsutil::write_atomic;
use crate::lora::{role_from_module, ALL_TARGETS};

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The PEFT release whose `adapter_config.json` field set we write.
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";

/// The LoRA settings an adapter directory records.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub rslora: bool,
    /// In model order (q, k, v, o, gate, up, down).
    pub targets: Vec<LinearRole>,
    /// The base model (HF repo id, directory or GGUF file) the adapter was trained on.
    pub base_model: Option<String>,
}

impl AdapterConfig {
    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            rslora: self.rslora,
        }
    }

    pub fn from_lora(lora: &LoraConfig, targets: &[LinearRole], base_model: Option<&str>) -> Self {
        let mut targets = targets.to_vec();
        targets.sort_by_key(|r| ALL_TARGETS.iter().position(|t| t == r));
        targets.dedup();
        AdapterConfig {
            rank: lora.rank,
            alpha: lora.alpha,
            dropout: lora.dropout,
            rslora: lora.rslora,
            targets,
            base_model: base_model.map(str::to_string),
        }
    }

    /// The JSON text PEFT would write for this config.
    pub fn to_json(&self) -> String {
        // An integral alpha is written as an integer, as PEFT writes `lora_alpha=64`.
        let alpha = if self.alpha.fract() == 0.0 && self.alpha.abs() < 1e15 {
            json!(self.alpha as i64)
        } else {
            json!(self.alpha)
        };
        let mut targets: Vec<&str> = self.targets.iter().map(|r| r.module_name()).collect();
        targets.sort_unstable();
        let mut m = Map::new();
        // Every field PEFT 0.21.2 writes; those rupantor does not use hold PEFT's defaults.
        for (k, v) in [
            ("alora_invocation_tokens", Value::Null),
            ("alpha_pattern", json!({})),
            ("arrow_config", Value::Null),
            ("auto_mapping", Value::Null),
            ("base_model_name_or_path", json!(self.base_model)),
            ("bias", json!("none")),
            ("corda_config", Value::Null),
            ("ensure_weight_tying", json!(false)),
            ("eva_config", Value::Null),
            ("exclude_modules", Value::Null),
            ("fan_in_fan_out", json!(false)),
            ("inference_mode", json!(true)),
            ("init_lora_weights", json!(true)),
            ("kasa_config", Value::Null),
            ("layer_replication", Value::Null),
            ("layers_pattern", Value::Null),
            ("layers_to_transform", Value::Null),
            ("loftq_config", json!({})),
            ("lora_alpha", alpha),
            ("lora_bias", json!(false)),
            // f32 -> f64 through the decimal text, so 0.05 is written as 0.05.
            (
                "lora_dropout",
                json!(self.dropout.to_string().parse::<f64>().unwrap_or(0.0)),
            ),
            ("lora_ga_config", Value::Null),
            ("megatron_config", Value::Null),
            ("megatron_core", json!("megatron.core")),
            ("modules_to_save", Value::Null),
            ("monteclora_config", Value::Null),
            ("peft_type", json!("LORA")),
            ("peft_version", json!(PEFT_FORMAT_VERSION)),
            ("qalora_group_size", json!(16)),
            ("r", json!(self.rank)),
            ("rank_pattern", json!({})),
            ("revision", Value::Null),
            ("target_modules", json!(targets)),
            ("target_parameters", Value::Null),
            ("task_type", json!("CAUSAL_LM")),
            ("trainable_token_indices", Value::Null),
            ("use_bdlora", Value::Null),
            ("use_dora", json!(false)),
            ("use_qalora", json!(false)),
            ("use_rslora", json!(self.rslora)),
            ("velora_config", Value::Null),
        ] {
            m.insert(k.to_string(), v);
        }
        // serde_json's map is sorted by key: PEFT's sort_keys=True.
        serde_json::to_string_pretty(&Value::Object(m)).expect("JSON of plain values")
    }

    /// Parses an `adapter_config.json`; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).with_context(|| format!("{origin}: not JSON"))?;
        let m = v
            .as_object()
            .with_context(|| format!("{origin}: not a JSON object"))?;
        let field = |k: &str| m.get(k).filter(|v| !v.is_null());
        match field("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            Some(other) => bail!("{origin}: peft_type {other:?} is not LORA"),
            None => bail!("{origin}: no peft_type (PEFT requires it)"),
        }
        let rank = field("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .with_context(|| format!("{origin}: \"r\" must be a positive integer"))?
            as usize;
        // PEFT's defaults where a field is absent: lora_alpha 8, dropout 0, rsLoRA off.
        let alpha = match field("lora_alpha") {
            None => 8.0,
            Some(v) => v
                .as_f64()
                .with_context(|| format!("{origin}: lora_alpha {v} is not a number"))?,
        };
        let dropout = match field("lora_dropout") {
            None => 0.0,
            Some(v) => v
                .as_f64()
                .filter(|p| (0.0..1.0).contains(p))
                .with_context(|| format!("{origin}: lora_dropout {v} is not in [0, 1)"))?
                as f32,
        };
        let rslora = field("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let targets = match field("target_modules") {
            Some(Value::String(s)) if s == "all-linear" => ALL_TARGETS.to_vec(),
            Some(Value::String(s)) => bail!(
                "{origin}: target_modules {s:?} is a regular expression; rupantor reads a list of \
                 module names ({})",
                module_list()
            ),
            Some(Value::Array(items)) => {
                let mut roles = Vec::new();
                for it in items {
                    let name = it.as_str().unwrap_or_default();
                    let role = role_from_module(name).with_context(|| {
                        format!("{origin}: target module {it} is none of {}", module_list())
                    })?;
                    roles.push(role);
                }
                roles
            }
            _ => bail!("{origin}: target_modules must be a list of module names"),
        };
        ensure!(!targets.is_empty(), "{origin}: target_modules is empty");
        // Settings that would change what the weights mean.
        let is_false = |k: &str| field(k).is_none_or(|v| v == &json!(false));
        let is_empty = |k: &str| {
            field(k).is_none_or(|v| v.as_object().is_some_and(Map::is_empty) || v == &json!([]))
        };
        for k in ["use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"] {
            ensure!(is_false(k), "{origin}: {k} = true is not supported");
        }
        for k in [
            "rank_pattern",
            "alpha_pattern",
            "modules_to_save",
            "layers_to_transform",
            "layer_replication",
            "trainable_token_indices",
            "exclude_modules",
        ] {
            ensure!(is_empty(k), "{origin}: {k} = {} is not supported", m[k]);
        }
        if let Some(b) = field("bias") {
            ensure!(
                b == &json!("none"),
                "{origin}: bias {b} is not supported (only \"none\")"
            );
        }
        let base_model = field("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(AdapterConfig::from_lora(
            &LoraConfig {
                rank,
                alpha,
                dropout,
                rslora,
            },
            &targets,
            base_model.as_deref(),
        ))
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(ADAPTER_CONFIG_FILE);
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        Self::from_json(&text, &path.display().to_string())
    }
}

fn module_list() -> String {
    ALL_TARGETS
        .iter()
        .map(|r| r.module_name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The A or B half of an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Half {
    A,
    B,
}

/// The PEFT key of one adapter weight of decoder layer `layer`.
pub fn peft_key(layer: usize, role: LinearRole, half: Half) -> String {
    let block = match role {
        LinearRole::GateProj | LinearRole::UpProj | LinearRole::DownProj => "mlp",
        _ => "self_attn",
    };
    let ab = match half {
        Half::A => "lora_A",
        Half::B => "lora_B",
    };
    format!(
        "base_model.model.model.layers.{layer}.{block}.{}.{ab}.weight",
        role.module_name()
    )
}

/// `(layer, role, half)` of a PEFT key. Accepts the causal-LM form PEFT writes for
/// `Gemma2ForCausalLM` / `Gemma3ForCausalLM` (`base_model.model.model.layers.N...`) and the
/// multimodal Gemma-3 form (`base_model.model.model.language_model.layers.N...`).
pub fn parse_peft_key(key: &str) -> Option<(usize, LinearRole, Half)> {
    let rest = key.strip_prefix("base_model.model.")?;
    let (rest, half) = if let Some(r) = rest.strip_suffix(".lora_A.weight") {
        (r, Half::A)
    } else {
        (rest.strip_suffix(".lora_B.weight")?, Half::B)
    };
    let parts: Vec<&str> = rest.split('.').collect();
    let at = parts.iter().position(|&p| p == "layers")?;
    let prefix = &parts[..at];
    if !matches!(
        prefix,
        ["model"] | ["model", "language_model"] | ["language_model", "model"]
    ) {
        return None;
    }
    let [layer, block, module] = parts[at + 1..] else {
        return None;
    };
    let layer: usize = layer.parse().ok()?;
    let role = role_from_module(module)?;
    let want_block = match role {
        LinearRole::GateProj | LinearRole::UpProj | LinearRole::DownProj => "mlp",
        _ => "self_attn",
    };
    (block == want_block).then_some((layer, role, half))
}

fn adapter_layer(a: &NamedAdapter) -> Result<usize> {
    a.layer
        .with_context(|| format!("adapter {} belongs to no decoder layer", a.name))
}

/// The adapter weights as PEFT's safetensors bytes (f32, `{"format": "pt"}`).
pub fn adapter_weights_bytes(adapters: &[NamedAdapter]) -> Result<Vec<u8>> {
    let mut data: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    for a in adapters {
        let layer = adapter_layer(a)?;
        for (half, var) in [(Half::A, &a.a), (Half::B, &a.b)] {
            let key = peft_key(layer, a.role, half);
            let values = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            if data
                .insert(key.clone(), (var.dims().to_vec(), values))
                .is_some()
            {
                bail!("two adapters map to {key}");
            }
        }
    }
    let views = data
        .iter()
        .map(|(k, (shape, v))| {
            Ok((
                k.as_str(),
                TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(v))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(safetensors::serialize(views, Some(meta))?)
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors`, each atomically.
pub fn save_adapter(dir: &Path, config: &AdapterConfig, adapters: &[NamedAdapter]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    for a in adapters {
        ensure!(
            config.targets.contains(&a.role),
            "adapter {} is a {} but the config targets {:?}",
            a.name,
            a.role.module_name(),
            config.targets
        );
        ensure!(
            a.a.dims()[0] == config.rank,
            "adapter {} has rank {}, the config {}",
            a.name,
            a.a.dims()[0],
            config.rank
        );
    }
    write_atomic(
        &dir.join(ADAPTER_WEIGHTS_FILE),
        &adapter_weights_bytes(adapters)?,
    )?;
    write_atomic(&dir.join(ADAPTER_CONFIG_FILE), config.to_json().as_bytes())
}

/// The weights of an adapter file: key -> (shape, f32 values).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterWeights {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl AdapterWeights {
    /// Reads `path`; F32, BF16 and F16 tensors are widened to f32.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        Self::from_bytes(&bytes, path)
    }

    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            let d = view.data();
            let values: Vec<f32> = match view.dtype() {
                Dtype::F32 => bytemuck::pod_collect_to_vec(d),
                Dtype::BF16 => d
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                Dtype::F16 => d
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                other => bail!(
                    "{}: tensor {name} is {other:?}; adapters load from F32, BF16 or F16",
                    path.display()
                ),
            };
            tensors.insert(name.to_string(), (view.shape().to_vec(), values));
        }
        Ok(AdapterWeights {
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// Copies the file's weights into `adapters`' variables. Every adapter must find its A
    /// `[r, in]` and B `[out, r]` with exactly its shapes, and every LoRA tensor of the file
    /// must belong to one of the adapters; nothing is written unless all fit.
    pub fn apply(&self, adapters: &[NamedAdapter]) -> Result<()> {
        let file = self.path.display();
        let mut by_slot: HashMap<(usize, LinearRole, Half), &str> = HashMap::new();
        for key in self.tensors.keys() {
            let slot = parse_peft_key(key).with_context(|| {
                format!(
                    "{file}: tensor {key} is not a LoRA weight of a Gemma projection \
                     (base_model.model.model.layers.N.{{self_attn,mlp}}.MODULE.lora_{{A,B}}.weight)"
                )
            })?;
            if let Some(prev) = by_slot.insert(slot, key) {
                bail!("{file}: {prev} and {key} are the same weight");
            }
        }
        let mut plan: Vec<(&Var, Tensor)> = Vec::new();
        let mut used = 0;
        for a in adapters {
            let layer = adapter_layer(a)?;
            for (half, var) in [(Half::A, &a.a), (Half::B, &a.b)] {
                let want = peft_key(layer, a.role, half);
                let Some(&key) = by_slot.get(&(layer, a.role, half)) else {
                    bail!(
                        "{file}: missing {want} (expected shape {:?}); the adapter does not \
                         cover this model's {} of layer {layer}",
                        var.dims(),
                        a.role.module_name()
                    );
                };
                let (shape, values) = &self.tensors[key];
                ensure!(
                    shape.as_slice() == var.dims(),
                    "{file}: {key} has shape {shape:?}, expected {:?}",
                    var.dims()
                );
                let t = Tensor::from_slice(values, shape.as_slice(), var.device())?
                    .to_dtype(var.dtype())?;
                plan.push((var, t));
                used += 1;
            }
        }
        if used != by_slot.len() {
            let mut known: Vec<(usize, LinearRole, Half)> = Vec::new();
            for a in adapters {
                let layer = adapter_layer(a)?;
                known.extend([(layer, a.role, Half::A), (layer, a.role, Half::B)]);
            }
            let extra: Vec<&str> = by_slot
                .iter()
                .filter(|(slot, _)| !known.contains(slot))
                .map(|(_, k)| *k)
                .collect();
            bail!(
                "{file}: {} tensor(s) for modules this model has no adapter on, e.g. {}",
                extra.len(),
                extra.first().copied().unwrap_or("?")
            );
        }
        for (var, t) in plan {
            var.set(&t)?;
        }
        Ok(())
    }
}

/// Reads an adapter directory: its config and weights.
pub fn read_adapter(dir: &Path) -> Result<(AdapterConfig, AdapterWeights)> {
    let config = AdapterConfig::load(dir)?;
    let weights = AdapterWeights::read(&dir.join(ADAPTER_WEIGHTS_FILE))?;
    Ok((config, weights))
}

/// Loads the adapter in `dir` into `adapters` after checking that its config matches theirs
/// (rank from the shapes; the caller checks alpha and targets through [`AdapterConfig`]).
pub fn load_adapter_weights(dir: &Path, adapters: &[NamedAdapter]) -> Result<AdapterConfig> {
    let (config, weights) = read_adapter(dir)?;
    weights.apply(adapters)?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn keys_round_trip_and_reject_strangers() {
        for layer in [0, 7, 41] {
            for role in ALL_TARGETS {
                for half in [Half::A, Half::B] {
                    let k = peft_key(layer, role, half);
                    assert_eq!(parse_peft_key(&k), Some((layer, role, half)), "{k}");
                }
            }
        }
        assert_eq!(
            peft_key(3, LinearRole::UpProj, Half::B),
            "base_model.model.model.layers.3.mlp.up_proj.lora_B.weight"
        );
        assert_eq!(
            parse_peft_key(
                "base_model.model.model.language_model.layers.2.self_attn.v_proj.lora_A.weight"
            ),
            Some((2, LinearRole::VProj, Half::A))
        );
        for bad in [
            "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
            "base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.lm_head.lora_A.weight",
            "model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        ] {
            assert_eq!(parse_peft_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn config_json_has_peft_fields_and_reads_back() {
        let cfg = AdapterConfig::from_lora(
            &LoraConfig {
                rank: 32,
                alpha: 64.0,
                dropout: 0.05,
                rslora: false,
            },
            &[LinearRole::VProj, LinearRole::QProj, LinearRole::DownProj],
            Some("google/gemma-2-9b-it"),
        );
        let text = cfg.to_json();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["peft_type"], "LORA");
        assert_eq!(v["r"], 32);
        assert_eq!(v["lora_alpha"], 64);
        assert_eq!(v["lora_dropout"], 0.05);
        assert_eq!(v["bias"], "none");
        assert_eq!(v["task_type"], "CAUSAL_LM");
        assert_eq!(v["use_rslora"], false);
        assert_eq!(v["base_model_name_or_path"], "google/gemma-2-9b-it");
        assert_eq!(
            v["target_modules"],
            json!(["down_proj", "q_proj", "v_proj"])
        );
        assert!(text.contains("\n  \"alpha_pattern\": {},\n"), "{text}");
        let back = AdapterConfig::from_json(&text, "test").unwrap();
        assert_eq!(
            back.targets,
            vec![LinearRole::QProj, LinearRole::VProj, LinearRole::DownProj]
        );
        assert_eq!(
            back,
            AdapterConfig {
                targets: back.targets.clone(),
                ..cfg
            }
        );
        // A minimal config takes PEFT's defaults.
        let min = AdapterConfig::from_json(
            r#"{"peft_type": "LORA", "r": 8, "target_modules": "all-linear"}"#,
            "min",
        )
        .unwrap();
        assert_eq!((min.rank, min.alpha, min.dropout), (8, 8.0, 0.0));
        assert_eq!(min.targets, ALL_TARGETS.to_vec());
    }

    #[test]
    fn configs_we_cannot_honour_are_refused_by_name() {
        let base = r#""peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]"#;
        for (extra, needle) in [
            (r#", "use_dora": true"#, "use_dora"),
            (r#", "bias": "all""#, "bias"),
            (r#", "rank_pattern": {"q_proj": 8}"#, "rank_pattern"),
            (r#", "modules_to_save": ["lm_head"]"#, "modules_to_save"),
            (r#", "layers_to_transform": [0, 1]"#, "layers_to_transform"),
        ] {
            let e = AdapterConfig::from_json(&format!("{{{base}{extra}}}"), "cfg").unwrap_err();
            assert!(e.to_string().contains(needle), "{extra}: {e}");
        }
        let e = AdapterConfig::from_json(r#"{"peft_type": "IA3", "r": 4}"#, "cfg").unwrap_err();
        assert!(e.to_string().contains("IA3"), "{e}");
        let e = AdapterConfig::from_json(
            r#"{"peft_type": "LORA", "r": 4, "target_modules": ["lm_head"]}"#,
            "cfg",
        )
        .unwrap_err();
        assert!(e.to_string().contains("lm_head"), "{e}");
        let e = AdapterConfig::from_json(
            r#"{"peft_type": "LORA", "r": 4, "target_modules": ".*proj"}"#,
            "cfg",
        )
        .unwrap_err();
        assert!(e.to_string().contains("regular expression"), "{e}");
    }

    fn named(layer: usize, role: LinearRole, r: usize, inp: usize, out: usize) -> NamedAdapter {
        let dev = Device::Cpu;
        let a: Vec<f32> = (0..r * inp).map(|i| i as f32 * 0.25 - 1.0).collect();
        let b: Vec<f32> = (0..out * r).map(|i| 0.5 - i as f32 * 0.125).collect();
        NamedAdapter {
            name: format!("model.layers.{layer}.x.{}.weight", role.module_name()),
            role,
            layer: Some(layer),
            a: Var::from_tensor(&Tensor::from_vec(a, (r, inp), &dev).unwrap()).unwrap(),
            b: Var::from_tensor(&Tensor::from_vec(b, (out, r), &dev).unwrap()).unwrap(),
        }
    }

    fn zeroed(a: &NamedAdapter) -> NamedAdapter {
        NamedAdapter {
            a: Var::zeros(a.a.dims(), candle_core::DType::F32, &Device::Cpu).unwrap(),
            b: Var::zeros(a.b.dims(), candle_core::DType::F32, &Device::Cpu).unwrap(),
            ..a.clone()
        }
    }

    #[test]
    fn save_then_load_restores_every_value_and_checks_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let ads = vec![
            named(0, LinearRole::QProj, 2, 8, 6),
            named(0, LinearRole::DownProj, 2, 5, 8),
            named(1, LinearRole::QProj, 2, 8, 6),
        ];
        let cfg = AdapterConfig::from_lora(
            &LoraConfig {
                rank: 2,
                alpha: 4.0,
                dropout: 0.0,
                rslora: true,
            },
            &[LinearRole::QProj, LinearRole::DownProj],
            None,
        );
        save_adapter(dir.path(), &cfg, &ads).unwrap();
        let fresh: Vec<NamedAdapter> = ads.iter().map(zeroed).collect();
        let got = load_adapter_weights(dir.path(), &fresh).unwrap();
        assert_eq!(got, cfg);
        for (x, y) in ads.iter().zip(&fresh) {
            for (p, q) in [(&x.a, &y.a), (&x.b, &y.b)] {
                assert_eq!(
                    p.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    q.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                );
            }
        }
        // Fewer adapters than the file has: the surplus is named.
        let e = load_adapter_weights(dir.path(), &fresh[..2]).unwrap_err();
        assert!(e.to_string().contains("layers.1.self_attn.q_proj"), "{e}");
        // A model adapter the file lacks: file, key and shape are named.
        let mut more = fresh.clone();
        more.push(zeroed(&named(1, LinearRole::KProj, 2, 8, 3)));
        let e = load_adapter_weights(dir.path(), &more)
            .unwrap_err()
            .to_string();
        assert!(e.contains(ADAPTER_WEIGHTS_FILE), "{e}");
        assert!(e.contains("layers.1.self_attn.k_proj.lora_A.weight"), "{e}");
        assert!(e.contains("[2, 8]"), "{e}");
        // A rank mismatch: the shape expected is named, and nothing was written.
        let wrong: Vec<NamedAdapter> = ads
            .iter()
            .map(|a| {
                zeroed(&named(
                    a.layer.unwrap(),
                    a.role,
                    3,
                    a.a.dims()[1],
                    a.b.dims()[0],
                ))
            })
            .collect();
        let e = load_adapter_weights(dir.path(), &wrong)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected [3, 8]"), "{e}");
        assert!(wrong[0]
            .a
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|&v| v == 0.0));
    }

    #[test]
    fn bf16_and_f16_files_load_widened() {
        let ad = named(0, LinearRole::VProj, 2, 4, 3);
        let a = ad.a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = ad.b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bf: Vec<u8> = a
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let hf: Vec<u8> = b
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let bytes = safetensors::serialize(
            [
                (
                    peft_key(0, LinearRole::VProj, Half::A),
                    TensorView::new(Dtype::BF16, vec![2, 4], &bf).unwrap(),
                ),
                (
                    peft_key(0, LinearRole::VProj, Half::B),
                    TensorView::new(Dtype::F16, vec![3, 2], &hf).unwrap(),
                ),
            ],
            None,
        )
        .unwrap();
        let w = AdapterWeights::from_bytes(&bytes, Path::new("x.safetensors")).unwrap();
        let target = zeroed(&ad);
        w.apply(std::slice::from_ref(&target)).unwrap();
        // The test values are exact in bf16 and f16.
        assert_eq!(target.a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), a);
        assert_eq!(target.b.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b);
        let i8s = safetensors::serialize(
            [(
                peft_key(0, LinearRole::VProj, Half::A),
                TensorView::new(Dtype::I8, vec![1], &[1u8]).unwrap(),
            )],
            None,
        )
        .unwrap();
        let e = AdapterWeights::from_bytes(&i8s, Path::new("y.safetensors")).unwrap_err();
        assert!(e.to_string().contains("I8"), "{e}");
    }
}
