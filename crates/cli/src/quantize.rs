//! `rupantor quantize`: turn the linear weights of a safetensors checkpoint into NF4 in the
//! layout HF transformers saves for bitsandbytes 4-bit models, or (`--dequantize`) back.
//!
//! Tensors are read through a memory map and written one at a time, so memory stays near
//! the largest tensor (plus its f32 copy) whatever the checkpoint size.

use crate::safetensors_out::StreamingWriter;
use anyhow::{bail, Context, Result};
use clap::Args;
use half::{bf16, f16};
use indicatif::{ProgressBar, ProgressStyle};
use memmap2::Mmap;
use rupantor_quant::bnb_layout::{self, RawTensor};
use rupantor_quant::{Nf4Tensor, SourceDtype};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// A .safetensors file, an HF model directory (model.safetensors or a sharded index), or
    /// an HF hub repo id org/name (the HF cache, then a download).
    #[arg(long)]
    pub input: PathBuf,
    /// Output .safetensors file, or a directory to write a loadable HF model directory into
    /// (model.safetensors, config.json with its quantization_config, tokenizer files).
    #[arg(long)]
    pub output: PathBuf,
    /// Reverse: expand NF4 weights back to their original dtype.
    #[arg(long)]
    pub dequantize: bool,
}

/// The safetensors files of a checkpoint, memory-mapped.
struct Checkpoint {
    shards: Vec<(PathBuf, Mmap)>,
}

impl Checkpoint {
    fn open(input: &Path) -> Result<Self> {
        let files = if input.is_dir() {
            let index = input.join("model.safetensors.index.json");
            let single = input.join("model.safetensors");
            if index.exists() {
                let text = std::fs::read_to_string(&index)
                    .with_context(|| format!("reading {}", index.display()))?;
                let v: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("{}: invalid JSON", index.display()))?;
                let map = v
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .with_context(|| {
                        format!(
                            "{}: field \"weight_map\": expected an object",
                            index.display()
                        )
                    })?;
                let mut shards: Vec<String> = map
                    .values()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect();
                shards.sort();
                shards.dedup();
                shards.into_iter().map(|s| input.join(s)).collect()
            } else if single.exists() {
                vec![single]
            } else {
                bail!(
                    "{}: no model.safetensors or model.safetensors.index.json",
                    input.display()
                );
            }
        } else if input.exists() {
            vec![input.to_path_buf()]
        } else {
            bail!("{}: no such file or directory", input.display());
        };
        let mut shards = Vec::new();
        for path in files {
            let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: the file is opened read-only and not modified while mapped by this process.
            let map = unsafe { Mmap::map(&file) }
                .with_context(|| format!("mapping {}", path.display()))?;
            SafeTensors::deserialize(&map).map_err(|e| {
                anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display())
            })?;
            shards.push((path, map));
        }
        Ok(Checkpoint { shards })
    }

    /// Every tensor as (shard index, name), in file order within each shard.
    fn tensors(&self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for (i, (_, map)) in self.shards.iter().enumerate() {
            let st = SafeTensors::deserialize(map).expect("validated on open");
            let mut names: Vec<(usize, String)> = st
                .tensors()
                .into_iter()
                .map(|(n, v)| (v.data().as_ptr() as usize, n))
                .collect();
            names.sort();
            out.extend(names.into_iter().map(|(_, n)| (i, n)));
        }
        out
    }

    fn get(&self, shard: usize, name: &str) -> Result<(RawTensor, &Path)> {
        let (path, map) = &self.shards[shard];
        let st = SafeTensors::deserialize(map).expect("validated on open");
        let v = st
            .tensor(name)
            .with_context(|| format!("{}: tensor {name}", path.display()))?;
        Ok((
            RawTensor {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            },
            path,
        ))
    }

    fn find(&self, name: &str) -> Option<RawTensor> {
        self.shards.iter().find_map(|(_, map)| {
            let st = SafeTensors::deserialize(map).ok()?;
            let v = st.tensor(name).ok()?;
            Some(RawTensor {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            })
        })
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        let mut meta = BTreeMap::new();
        for (_, map) in &self.shards {
            if let Ok((_, m)) = SafeTensors::read_metadata(map) {
                if let Some(md) = m.metadata() {
                    meta.extend(md.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        meta
    }

    fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|(_, m)| m.len() as u64).sum()
    }
}

/// The weights bitsandbytes quantizes in a causal LM: the 2-D weights of the linear
/// projections (`q_proj`, ..., `down_proj`). Embeddings, norms and the head stay as they are.
pub fn is_quantizable(name: &str, t: &RawTensor) -> bool {
    name.ends_with("_proj.weight")
        && t.shape.len() == 2
        && matches!(t.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16)
}

fn to_f32(name: &str, t: &RawTensor) -> Result<(Vec<f32>, SourceDtype)> {
    Ok(match t.dtype {
        Dtype::F32 => (bytemuck::pod_collect_to_vec(&t.data), SourceDtype::F32),
        Dtype::BF16 => {
            let v: Vec<bf16> = bytemuck::pod_collect_to_vec(&t.data);
            (v.iter().map(|x| x.to_f32()).collect(), SourceDtype::Bf16)
        }
        Dtype::F16 => {
            let v: Vec<f16> = bytemuck::pod_collect_to_vec(&t.data);
            (v.iter().map(|x| x.to_f32()).collect(), SourceDtype::F16)
        }
        d => bail!("{name}: dtype {d:?} cannot be quantized"),
    })
}

fn dequantized_bytes(t: &Nf4Tensor) -> (Dtype, Vec<u8>) {
    match t.dtype {
        SourceDtype::F32 => (Dtype::F32, bytemuck::cast_slice(&t.dequantize()).to_vec()),
        SourceDtype::Bf16 => (
            Dtype::BF16,
            bytemuck::cast_slice(&t.dequantize_bf16()).to_vec(),
        ),
        SourceDtype::F16 => (
            Dtype::F16,
            bytemuck::cast_slice(&t.dequantize_f16()).to_vec(),
        ),
    }
}

/// Files copied alongside the weights when the output is a model directory.
const COMPANION_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
];

pub fn run(mut args: QuantizeArgs) -> Result<()> {
    // An HF repo id (or the embedded alias) where no such path exists: the model argument's
    // resolution (HF cache, then a download).
    if !args.input.exists() {
        if let Some(arg) = args.input.to_str() {
            if rupantor_model::hub::is_repo_id(arg) || arg.starts_with("embedded:") {
                args.input = crate::model_arg::resolve_model(arg)?;
            }
        }
    }
    let ckpt = Checkpoint::open(&args.input)?;
    let to_dir = args.output.extension().is_none_or(|e| e != "safetensors");
    let weights_path = if to_dir {
        args.output.join("model.safetensors")
    } else {
        args.output.clone()
    };
    let mut writer = StreamingWriter::create(&weights_path)?;
    let mut metadata = ckpt.metadata();
    metadata.insert("format".into(), "pt".into());
    writer.set_metadata(metadata);

    let bar = ProgressBar::with_draw_target(
        Some(ckpt.total_bytes()),
        rupantor_train::progress::draw_target(true),
    )
    .with_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(if args.dequantize {
        "dequantize"
    } else {
        "quantize"
    });
    let (mut converted, mut passed) = (0usize, 0usize);
    for (shard, name) in ckpt.tensors() {
        if args.dequantize && bnb_layout::is_companion(&name) {
            continue;
        }
        let (t, path) = ckpt.get(shard, &name)?;
        bar.inc(t.data.len() as u64);
        if args.dequantize {
            if ckpt
                .find(&format!("{name}{}", bnb_layout::QUANT_STATE_SUFFIX))
                .is_some()
            {
                let q = bnb_layout::from_tensors(&name, |n| ckpt.find(n))
                    .with_context(|| format!("{}: reading NF4 weight", path.display()))?;
                let (dtype, bytes) = dequantized_bytes(&q);
                writer.add(&name, dtype, &q.shape, &bytes)?;
                converted += 1;
                continue;
            }
        } else if is_quantizable(&name, &t) {
            let (values, dtype) = to_f32(&name, &t)?;
            let q = Nf4Tensor::quantize(&values, &t.shape, dtype);
            for (n, part) in bnb_layout::to_tensors(&name, &q) {
                writer.add(&n, part.dtype, &part.shape, &part.data)?;
            }
            converted += 1;
            continue;
        }
        writer.add(&name, t.dtype, &t.shape, &t.data)?;
        passed += 1;
    }
    writer.finish()?;
    bar.finish_and_clear();
    if to_dir {
        write_model_dir_files(&args.input, &args.output, args.dequantize)?;
    }
    eprintln!(
        "{} {converted} linear weights, passed {passed} tensors through unchanged -> {}",
        if args.dequantize {
            "dequantized"
        } else {
            "quantized"
        },
        args.output.display()
    );
    Ok(())
}

/// config.json with `quantization_config` set (or removed) and the tokenizer files, so the
/// output directory loads in HF transformers as a bitsandbytes 4-bit model.
fn write_model_dir_files(input: &Path, out: &Path, dequantize: bool) -> Result<()> {
    let src_dir = if input.is_dir() {
        input.to_path_buf()
    } else {
        input.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let config_path = src_dir.join("config.json");
    if config_path.exists() {
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        let mut config: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", config_path.display()))?;
        let obj = config
            .as_object_mut()
            .with_context(|| format!("{}: expected a JSON object", config_path.display()))?;
        if dequantize {
            obj.remove("quantization_config");
        } else {
            obj.insert(
                "quantization_config".into(),
                serde_json::json!({
                    "quant_method": "bitsandbytes",
                    "load_in_4bit": true,
                    "load_in_8bit": false,
                    "bnb_4bit_quant_type": "nf4",
                    "bnb_4bit_use_double_quant": true,
                    "bnb_4bit_compute_dtype": "bfloat16",
                    "bnb_4bit_quant_storage": "uint8",
                    "llm_int8_skip_modules": null,
                    "llm_int8_threshold": 6.0,
                    "llm_int8_has_fp16_weight": false,
                    "llm_int8_enable_fp32_cpu_offload": false
                }),
            );
        }
        write_atomic(
            &out.join("config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
    }
    for name in COMPANION_FILES {
        let src = src_dir.join(name);
        if src.exists() {
            let bytes =
                std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
            write_atomic(&out.join(name), &bytes)?;
        }
    }
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}
