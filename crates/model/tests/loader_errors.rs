//! Every way an HF directory can be wrong gives one error naming the file (and tensor), never a
//! panic.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use rupantor_model::{load_gemma, ConfigError, LoadError};

fn load_err(dir: &Path) -> LoadError {
    load_gemma(dir, &Device::Cpu).expect_err("load should fail")
}

#[test]
fn missing_config_json() {
    let dir = model_dir("gemma2", "config.json");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = load_err(dir.path());
    assert!(matches!(e, LoadError::MissingConfig { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("config.json") && msg.contains(&dir.path().display().to_string()));
}

#[test]
fn unknown_model_type() {
    let dir = model_dir("gemma2", "config.json");
    let path = dir.path().join("config.json");
    let mut cfg = read_json(&path);
    cfg["model_type"] = "llama".into();
    cfg["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    write_json(&path, &cfg);
    let e = load_err(dir.path());
    assert!(
        matches!(
            e,
            LoadError::Config {
                source: ConfigError::UnknownArchitecture { .. },
                ..
            }
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("llama") && msg.contains("LlamaForCausalLM"),
        "{msg}"
    );
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn malformed_config_json() {
    let dir = model_dir("gemma2", "config.json");
    let path = dir.path().join("config.json");
    std::fs::write(&path, "{\"model_type\": \"gemma2\", ").unwrap();
    let e = load_err(dir.path());
    assert!(matches!(e, LoadError::Config { .. }), "{e:?}");
    assert!(e.to_string().contains("config.json"));
}

#[test]
fn no_weights_at_all() {
    let dir = model_dir("gemma2", "config.json");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = load_err(dir.path());
    assert!(matches!(e, LoadError::MissingWeights { .. }), "{e:?}");
    assert!(e.to_string().contains("model.safetensors"));
}

/// Rewrites the fixture's weights through `edit` into a fresh directory.
fn edited(name: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let dir = model_dir(name, "config.json");
    let mut w = weights(name);
    edit(&mut w);
    save(&w, &dir.path().join("model.safetensors"));
    dir
}

#[test]
fn missing_tensor_names_tensor_and_file() {
    let gone = "model.layers.1.mlp.up_proj.weight";
    let dir = edited("gemma2", |w| {
        w.remove(gone);
    });
    let e = load_err(dir.path());
    match &e {
        LoadError::MissingTensor { name, searched } => {
            assert_eq!(name, gone);
            assert_eq!(searched, &[dir.path().join("model.safetensors")]);
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains(gone) && msg.contains("model.safetensors"),
        "{msg}"
    );
}

#[test]
fn missing_gemma3_qk_norm() {
    let gone = "model.layers.2.self_attn.k_norm.weight";
    let dir = edited("gemma3", |w| {
        w.remove(gone);
    });
    let e = load_err(dir.path());
    assert!(e.to_string().contains(gone), "{e}");
}

#[test]
fn shape_disagreeing_with_config() {
    let dir = model_dir("gemma2", "config.json");
    let path = dir.path().join("config.json");
    let mut cfg = read_json(&path);
    cfg["intermediate_size"] = 96.into();
    write_json(&path, &cfg);
    let e = load_err(dir.path());
    match &e {
        LoadError::ShapeMismatch {
            name,
            file,
            expected,
            found,
        } => {
            assert_eq!(name, "model.layers.0.mlp.gate_proj.weight");
            assert_eq!(file, &dir.path().join("model.safetensors"));
            assert_eq!(expected, &[96, 64]);
            assert_eq!(found, &[64, 64]);
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("[96, 64]") && msg.contains("[64, 64]"),
        "{msg}"
    );
}

#[test]
fn wrongly_shaped_tensor_in_file() {
    let dir = edited("gemma3", |w| {
        w.insert(
            "model.layers.1.self_attn.q_norm.weight".into(),
            Tensor::zeros(8, DType::F16, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(dir.path());
    assert!(
        matches!(&e, LoadError::ShapeMismatch { name, .. } if name == "model.layers.1.self_attn.q_norm.weight"),
        "{e:?}"
    );
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = model_dir("gemma2", "config.json");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(dir.path());
    assert!(matches!(e, LoadError::Corrupt { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn corrupt_header_and_tiny_file() {
    let dir = model_dir("gemma2", "config.json");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..24].copy_from_slice(b"\x00garbage-header\xff");
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(load_err(dir.path()), LoadError::Corrupt { .. }));
    // A header length pointing past the end of the file.
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(load_err(dir.path()), LoadError::Corrupt { .. }));
    std::fs::write(&path, b"abc").unwrap();
    let e = load_err(dir.path());
    assert!(matches!(e, LoadError::Corrupt { .. }), "{e:?}");
}

#[test]
fn unsupported_dtype() {
    let name = "model.layers.0.self_attn.o_proj.weight";
    let dir = edited("gemma2", |w| {
        let shape = w[name].dims().to_vec();
        w.insert(
            name.into(),
            Tensor::zeros(shape, DType::U8, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(dir.path());
    assert!(matches!(e, LoadError::UnsupportedDtype { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(name) && msg.contains("U8"), "{msg}");
}

fn sharded_dir() -> tempfile::TempDir {
    let dir = model_dir("gemma2", "config.json");
    let single = dir.path().join("model.safetensors");
    let shard = dir.path().join("model-00001-of-00002.safetensors");
    std::fs::rename(&single, &shard).unwrap();
    let mut map = serde_json::Map::new();
    for k in weights("gemma2").keys() {
        map.insert(k.clone(), "model-00001-of-00002.safetensors".into());
    }
    map.insert(
        "model.layers.9.extra.weight".into(),
        "model-00002-of-00002.safetensors".into(),
    );
    write_json(
        &dir.path().join("model.safetensors.index.json"),
        &serde_json::json!({"weight_map": map}),
    );
    dir
}

#[test]
fn missing_shard_names_the_shard() {
    let dir = sharded_dir();
    let e = load_err(dir.path());
    assert!(matches!(e, LoadError::Io { .. }), "{e:?}");
    assert!(
        e.to_string().contains("model-00002-of-00002.safetensors"),
        "{e}"
    );
}

#[test]
fn malformed_index() {
    let dir = sharded_dir();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        "{\"weight_map\": [1, 2]}",
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(matches!(e, LoadError::Index { .. }), "{e:?}");
    assert!(e.to_string().contains("model.safetensors.index.json"));
}

#[test]
fn untied_checkpoint_needs_lm_head() {
    let dir = model_dir("gemma2", "config.json");
    let path = dir.path().join("config.json");
    let mut cfg = read_json(&path);
    cfg["tie_word_embeddings"] = false.into();
    write_json(&path, &cfg);
    let e = load_err(dir.path());
    assert!(
        matches!(&e, LoadError::MissingTensor { name, .. } if name == "lm_head.weight"),
        "{e:?}"
    );

    // With an explicit lm_head equal to the embedding, logits are unchanged.
    let mut w = weights("gemma2");
    w.insert(
        "lm_head.weight".into(),
        w["model.embed_tokens.weight"].clone(),
    );
    save(&w, &dir.path().join("model.safetensors"));
    let m = load_gemma(dir.path(), &Device::Cpu).unwrap();
    let r = reference("gemma2");
    let logits = m
        .forward(&r["input_ids"].to_dtype(DType::U32).unwrap(), 0, None, None)
        .unwrap();
    assert!(max_abs_diff(&logits, &r["logits"]) <= 1e-4);
}
