//! Pre-quantized bitsandbytes 4-bit checkpoints: the tiny fixtures are quantized in-test with
//! our codec into HF's bnb layout, then loaded without re-quantization.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use rupantor_model::{
    load_gemma, load_gemma_with, Gemma, Linear, LinearBuilder, LinearWeight, LoadError,
    QLoraBuilder, QuantizedWeight, SafetensorsStore,
};
use rupantor_quant::bnb_layout::{self, RawTensor};
use rupantor_quant::{Nf4Tensor, SourceDtype};
use safetensors::tensor::TensorView;

/// transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
/// bnb_4bit_use_double_quant=True)` as saved in config.json.
fn bnb_config() -> serde_json::Value {
    serde_json::json!({
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
    })
}

const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

fn is_projection(name: &str) -> bool {
    PROJECTIONS
        .iter()
        .any(|p| name.ends_with(&format!("{p}.weight")))
}

/// The fixture as bitsandbytes would save it: every decoder projection quantized to NF4 (six
/// tensors each), embedding and norms left in bf16. `edit` may change the tensor list and the
/// config before they are written.
fn bnb_dir(
    name: &str,
    edit: impl FnOnce(&mut Vec<(String, RawTensor)>, &mut serde_json::Value),
) -> tempfile::TempDir {
    let src = SafetensorsStore::open_dir(&fixture(name)).unwrap();
    let mut tensors = Vec::new();
    let mut quantized = 0;
    let mut names: Vec<&str> = src.names().collect();
    names.sort();
    for n in names {
        let raw = src.raw(n).unwrap();
        if is_projection(n) {
            // The quant state records the dtype the weight had, as bitsandbytes does.
            let dtype = match raw.dtype {
                safetensors::Dtype::BF16 => SourceDtype::Bf16,
                safetensors::Dtype::F16 => SourceDtype::F16,
                safetensors::Dtype::F32 => SourceDtype::F32,
                other => panic!("{n}: fixture dtype {other:?}"),
            };
            let values = src.load_f32(n, &raw.shape).unwrap();
            let values = values.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let nf4 = Nf4Tensor::quantize(&values, &raw.shape, dtype);
            tensors.extend(bnb_layout::to_tensors(n, &nf4));
            quantized += 1;
        } else {
            tensors.push((n.to_string(), raw));
        }
    }
    assert!(quantized >= 14, "{name}: only {quantized} projections");
    let mut config = read_json(&fixture(name).join("config.json"));
    config["quantization_config"] = bnb_config();
    edit(&mut tensors, &mut config);

    let dir = tempfile::tempdir().unwrap();
    write_json(&dir.path().join("config.json"), &config);
    write_raw(&tensors, &dir.path().join("model.safetensors"));
    dir
}

fn write_raw(tensors: &[(String, RawTensor)], path: &Path) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Delegates to a [`QLoraBuilder`], counting which entry point each weight took.
struct Counting {
    inner: QLoraBuilder,
    f32_weights: usize,
    nf4_weights: usize,
}

impl LinearBuilder for Counting {
    fn build(&mut self, w: LinearWeight) -> candle_core::Result<Box<dyn Linear>> {
        self.f32_weights += 1;
        self.inner.build(w)
    }

    fn build_quantized(&mut self, w: QuantizedWeight) -> candle_core::Result<Box<dyn Linear>> {
        self.nf4_weights += 1;
        self.inner.build_quantized(w)
    }
}

fn counting() -> Counting {
    let mut inner = QLoraBuilder::new(&Device::Cpu);
    inner.rank = 4;
    inner.alpha = 8.0;
    Counting {
        inner,
        f32_weights: 0,
        nf4_weights: 0,
    }
}

fn logits(m: &Gemma, name: &str) -> Tensor {
    let ids = reference(name)["input_ids"].to_dtype(DType::U32).unwrap();
    m.forward(&ids, 0, None, None).unwrap()
}

#[test]
fn prequantized_checkpoint_equals_quantizing_on_load() {
    for name in ["gemma2", "gemma3"] {
        let dir = bnb_dir(name, |_, _| {});
        let mut from_bnb = counting();
        let a = load_gemma_with(dir.path(), &Device::Cpu, &mut from_bnb).unwrap();
        let mut from_f32 = counting();
        let b = load_gemma_with(&fixture(name), &Device::Cpu, &mut from_f32).unwrap();

        let layers = a.config().num_hidden_layers;
        // Only the tied lm_head (the bf16 embedding) arrives as f32 from the bnb checkpoint.
        assert_eq!(
            (from_bnb.nf4_weights, from_bnb.f32_weights),
            (7 * layers, 1)
        );
        assert_eq!(
            (from_f32.nf4_weights, from_f32.f32_weights),
            (0, 7 * layers + 1)
        );
        assert_eq!(from_bnb.inner.adapters().len(), 7 * layers);

        let (la, lb) = (logits(&a, name), logits(&b, name));
        let d = max_abs_diff(&la, &lb);
        println!("{name}: bnb-4bit checkpoint vs quantize-on-load: max |dlogit| = {d:e}");
        assert_eq!(d, 0.0, "{name}: the two NF4 paths differ");

        // A dense builder dequantizes the same NF4 data: same logits up to summation order.
        let dense = load_gemma(dir.path(), &Device::Cpu).unwrap();
        let d = max_abs_diff(&logits(&dense, name), &la);
        assert!(d < 1e-4, "{name}: dense over bnb differs by {d}");
    }
}

fn load_err(dir: &Path) -> LoadError {
    load_gemma_with(dir, &Device::Cpu, &mut counting()).expect_err("load should fail")
}

const Q0: &str = "model.layers.0.self_attn.q_proj.weight";

#[test]
fn quantized_tensors_without_quantization_config_are_an_error() {
    let dir = bnb_dir("gemma2", |_, cfg| {
        cfg.as_object_mut().unwrap().remove("quantization_config");
    });
    let e = load_err(dir.path());
    assert!(
        matches!(e, LoadError::UndeclaredQuantization { .. }),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("model.layers.0.") && msg.contains("model.safetensors"),
        "{msg}"
    );
    assert!(msg.contains("quantization_config"), "{msg}");
}

#[test]
fn missing_companion_tensor_names_it_and_the_file() {
    let dir = bnb_dir("gemma3", |t, _| {
        t.retain(|(n, _)| n != &format!("{Q0}.nested_absmax"));
    });
    let e = load_err(dir.path());
    assert!(matches!(e, LoadError::Quantized { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("{Q0}.nested_absmax")) && msg.contains("model.safetensors"),
        "{msg}"
    );
}

#[test]
fn quantized_shape_disagreeing_with_config_is_named() {
    // Quantize k_proj of layer 1 with its rows and columns swapped: same element count, so
    // only the quant state's shape betrays it.
    let k1 = "model.layers.1.self_attn.k_proj.weight";
    let dir = bnb_dir("gemma2", |t, _| {
        // The fixture's k_proj is [kv heads 2 * head_dim 16, hidden 64].
        let nf4 = Nf4Tensor::quantize_f32(&[0.5; 32 * 64], &[64, 32]);
        t.retain(|(n, _)| !n.starts_with(k1));
        t.extend(bnb_layout::to_tensors(k1, &nf4));
    });
    let e = load_err(dir.path());
    let LoadError::ShapeMismatch {
        name,
        expected,
        found,
        ..
    } = &e
    else {
        panic!("{e:?}");
    };
    assert_eq!(name, k1);
    assert_eq!(expected, &[32, 64]);
    assert_eq!(found, &[64, 32]);
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn unsupported_quantization_is_a_config_error() {
    let dir = bnb_dir("gemma2", |_, cfg| {
        cfg["quantization_config"]["bnb_4bit_quant_type"] = "fp4".into();
    });
    let e = load_err(dir.path());
    let msg = e.to_string();
    assert!(
        msg.contains("config.json") && msg.contains("fp4") && msg.contains("bnb-4bit"),
        "{msg}"
    );
}
