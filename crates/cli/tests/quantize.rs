//! `rupantor quantize` end to end on a small checkpoint written by the test.

use half::bf16;
use rupantor_quant::bnb_layout::{self, QuantStateJson, RawTensor};
use rupantor_quant::Nf4Tensor;
use safetensors::{serialize_to_file, Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

fn rupantor(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rupantor"))
        .args(args)
        .output()
        .expect("run rupantor")
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0
                - 0.5)
                * 0.1
        })
        .collect()
}

/// A tiny checkpoint: two projections (bf16, f32), an embedding, a norm and a 1-D bias.
fn write_checkpoint(path: &Path) -> HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let q: Vec<bf16> = values(96 * 64, 1).into_iter().map(bf16::from_f32).collect();
    let down = values(64 * 130, 2);
    let embed = values(50 * 64, 3);
    let norm = values(64, 4);
    let mut t: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> = HashMap::new();
    t.insert(
        "model.layers.0.self_attn.q_proj.weight".into(),
        (Dtype::BF16, vec![96, 64], bytemuck::cast_slice(&q).to_vec()),
    );
    t.insert(
        "model.layers.0.mlp.down_proj.weight".into(),
        (
            Dtype::F32,
            vec![64, 130],
            bytemuck::cast_slice(&down).to_vec(),
        ),
    );
    t.insert(
        "model.embed_tokens.weight".into(),
        (
            Dtype::F32,
            vec![50, 64],
            bytemuck::cast_slice(&embed).to_vec(),
        ),
    );
    t.insert(
        "model.norm.weight".into(),
        (Dtype::F32, vec![64], bytemuck::cast_slice(&norm).to_vec()),
    );
    t.insert(
        "model.layers.0.self_attn.o_proj.bias".into(),
        (Dtype::F32, vec![64], bytemuck::cast_slice(&norm).to_vec()),
    );
    let views: Vec<(String, safetensors::tensor::TensorView)> = t
        .iter()
        .map(|(k, (d, s, b))| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    serialize_to_file(views, None, path).unwrap();
    t
}

fn raw(st: &SafeTensors, name: &str) -> Option<RawTensor> {
    st.tensor(name).ok().map(|v| RawTensor {
        dtype: v.dtype(),
        shape: v.shape().to_vec(),
        data: v.data().to_vec(),
    })
}

#[test]
fn quantize_then_dequantize_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let original = write_checkpoint(&input);
    let q_path = dir.path().join("q.safetensors");
    let out = rupantor(&[
        "quantize",
        "--input",
        input.to_str().unwrap(),
        "--output",
        q_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bytes = std::fs::read(&q_path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    // Projections became the six bitsandbytes tensors; everything else is untouched.
    for w in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    ] {
        let (dtype, shape, data) = &original[w];
        let packed = st.tensor(w).unwrap();
        assert_eq!(packed.dtype(), Dtype::U8);
        let n: usize = shape.iter().product();
        assert_eq!(packed.shape(), &[n.div_ceil(2), 1]);
        let state = QuantStateJson::parse(
            w,
            st.tensor(&format!("{w}{}", bnb_layout::QUANT_STATE_SUFFIX))
                .unwrap()
                .data(),
        )
        .unwrap();
        assert_eq!(&state.shape, shape);
        let q = bnb_layout::from_tensors(w, |n| raw(&st, n)).unwrap();
        let expect = match dtype {
            Dtype::BF16 => {
                let v: Vec<bf16> = bytemuck::pod_collect_to_vec(data);
                Nf4Tensor::quantize_bf16(&v, shape)
            }
            _ => Nf4Tensor::quantize_f32(&bytemuck::pod_collect_to_vec(data), shape),
        };
        assert_eq!(q, expect, "{w}");
    }
    for w in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.o_proj.bias",
    ] {
        assert_eq!(
            st.tensor(w).unwrap().data(),
            original[w].2.as_slice(),
            "{w} passes through"
        );
    }
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );

    let d_path = dir.path().join("d.safetensors");
    let out = rupantor(&[
        "quantize",
        "--dequantize",
        "--input",
        q_path.to_str().unwrap(),
        "--output",
        d_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&d_path).unwrap();
    let back = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = back.names();
    names.sort();
    let mut want: Vec<&String> = original.keys().collect();
    want.sort();
    assert_eq!(names, want, "exactly the original tensor names come back");
    let down = back.tensor("model.layers.0.mlp.down_proj.weight").unwrap();
    assert_eq!(down.dtype(), Dtype::F32);
    let got: Vec<f32> = bytemuck::pod_collect_to_vec(down.data());
    let orig: Vec<f32> =
        bytemuck::pod_collect_to_vec(&original["model.layers.0.mlp.down_proj.weight"].2);
    let err = got
        .iter()
        .zip(&orig)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // Values lie in [-0.05, 0.05]; the widest NF4 gap is 0.304, so the error is at most 0.152 * absmax.
    assert!(err <= 0.05 * 0.153, "NF4 round trip error {err}");
    assert_eq!(
        back.tensor("model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .dtype(),
        Dtype::BF16
    );
}

#[test]
fn model_directory_output_carries_config_and_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    write_checkpoint(&model.join("model.safetensors"));
    std::fs::write(
        model.join("config.json"),
        r#"{"model_type": "gemma2", "hidden_size": 64}"#,
    )
    .unwrap();
    std::fs::write(model.join("tokenizer.json"), "{}").unwrap();
    let out_dir = dir.path().join("nf4");
    let out = rupantor(&[
        "quantize",
        "--input",
        model.to_str().unwrap(),
        "--output",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["quantization_config"]["bnb_4bit_quant_type"], "nf4");
    assert_eq!(
        config["quantization_config"]["bnb_4bit_use_double_quant"],
        true
    );
    assert_eq!(config["hidden_size"], 64);
    assert!(out_dir.join("tokenizer.json").exists());
    assert!(out_dir.join("model.safetensors").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn bad_input_fails_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.safetensors");
    std::fs::write(&bad, b"not a safetensors file at all").unwrap();
    let out = rupantor(&[
        "quantize",
        "--input",
        bad.to_str().unwrap(),
        "--output",
        dir.path().join("o.safetensors").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );
    let missing = rupantor(&[
        "quantize",
        "--input",
        "/nonexistent/x.safetensors",
        "--output",
        "o.safetensors",
    ]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/x.safetensors"));
}
