//! Parity with HF transformers on the tiny fixtures of scripts/fixtures/gemma_tiny.py, and
//! proof that the forward pass is differentiable end to end.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};
use common::*;
use rupantor_model::{
    load_gemma, load_gemma_with, DenseLinear, Gemma, Linear, LinearRole, LinearWeight,
};

/// The bar set for the unquantized f32 path.
const TOL: f32 = 1e-4;

fn ids(reference: &HashMap<String, Tensor>, key: &str) -> Tensor {
    reference[key].to_dtype(DType::U32).unwrap()
}

fn check_logits(model: &Gemma, name: &str, what: &str) -> f32 {
    let r = reference(name);
    let logits = model.forward(&ids(&r, "input_ids"), 0, None, None).unwrap();
    assert_eq!(logits.dims(), r["logits"].dims());
    let d = max_abs_diff(&logits, &r["logits"]);
    println!(
        "{name} ({what}): max |dlogit| = {d:.3e} over {:?}",
        logits.dims()
    );
    assert!(d <= TOL, "{name} ({what}): max |dlogit| {d} > {TOL}");
    d
}

#[test]
fn gemma2_logits_match_hf_in_both_config_dialects() {
    for cfg in ["config.json", "config_v4.json"] {
        let dir = model_dir("gemma2", cfg);
        let m = load_gemma(dir.path(), &Device::Cpu).unwrap();
        check_logits(&m, "gemma2", cfg);
    }
}

#[test]
fn gemma3_logits_match_hf_in_both_config_dialects() {
    for cfg in ["config.json", "config_v5.json"] {
        let dir = model_dir("gemma3", cfg);
        let m = load_gemma(dir.path(), &Device::Cpu).unwrap();
        check_logits(&m, "gemma3", cfg);
    }
}

#[test]
fn fixtures_cover_what_they_claim() {
    let g2 = load_gemma(&fixture("gemma2"), &Device::Cpu).unwrap();
    let c = g2.config();
    assert!(c.attn_logit_softcapping.is_some() && c.final_logit_softcapping.is_some());
    assert_ne!(c.query_pre_attn_scalar, c.head_dim as f64);
    assert_eq!(
        c.layers.iter().map(|l| l.is_sliding).collect::<Vec<_>>(),
        [true, false]
    );
    let g3 = load_gemma(&fixture("gemma3"), &Device::Cpu).unwrap();
    let c = g3.config();
    assert!(c.qk_norm);
    assert_eq!(
        c.layers
            .iter()
            .map(|l| (l.is_sliding, l.rope_base, l.rope_linear_factor))
            .collect::<Vec<_>>(),
        [
            (true, 10_000.0, 1.0),
            (false, 1_000_000.0, 8.0),
            (true, 10_000.0, 1.0)
        ]
    );
    // The sequence must outrun the window for the sliding layers to matter.
    let r = reference("gemma3");
    assert!(r["input_ids"].dim(1).unwrap() > 2 * c.sliding_window);
}

#[test]
fn left_padded_batch_matches_hf() {
    for name in ["gemma2", "gemma3"] {
        let m = load_gemma(&fixture(name), &Device::Cpu).unwrap();
        let r = reference(name);
        let mask = &r["padded_attention_mask"];
        let logits = m
            .forward(&ids(&r, "padded_input_ids"), 0, None, Some(mask))
            .unwrap();
        let want = &r["padded_logits"];
        let keep = mask.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap();
        let mut worst = 0f32;
        for (b, row) in keep.iter().enumerate() {
            for (s, &k) in row.iter().enumerate() {
                if k == 0 {
                    continue; // outputs at padding positions are meaningless
                }
                let at = |t: &Tensor| t.get(b).unwrap().get(s).unwrap();
                worst = worst.max(max_abs_diff(&at(&logits), &at(want)));
            }
        }
        println!("{name} (left padding): max |dlogit| = {worst:.3e}");
        assert!(worst <= TOL, "{name}: padded logits differ by {worst}");
    }
}

#[test]
fn kv_cache_decoding_matches_hf() {
    for name in ["gemma2", "gemma3"] {
        let m = load_gemma(&fixture(name), &Device::Cpu).unwrap();
        let r = reference(name);
        let input = ids(&r, "input_ids");
        let seq = input.dim(1).unwrap();
        let mut cache = m.new_cache();
        let mut parts = vec![m
            .forward(&input.narrow(1, 0, 10).unwrap(), 0, Some(&mut cache), None)
            .unwrap()];
        for p in 10..seq {
            let step = input.narrow(1, p, 1).unwrap();
            parts.push(m.forward(&step, p, Some(&mut cache), None).unwrap());
        }
        let logits = Tensor::cat(&parts, 1).unwrap();
        let d = max_abs_diff(&logits, &r["logits"]);
        println!("{name} (kv cache, prefill 10 + 14 single steps): max |dlogit| = {d:.3e}");
        assert!(d <= TOL, "{name}: cached decoding differs by {d}");
    }
}

/// Loads `name` with every decoder linear as a trainable `Var`; returns the model and the vars
/// by checkpoint name.
fn trainable(name: &str) -> (Gemma, Vec<(String, Var)>) {
    let mut vars = Vec::new();
    let mut builder = |w: LinearWeight| -> candle_core::Result<Box<dyn Linear>> {
        if w.role == LinearRole::LmHead {
            return Ok(Box::new(DenseLinear::new(w.weight)?));
        }
        let v = Var::from_tensor(&w.weight)?;
        vars.push((w.name, v.clone()));
        Ok(Box::new(DenseLinear::trainable(v)?))
    };
    let m = load_gemma_with(&fixture(name), &Device::Cpu, &mut builder).unwrap();
    (m, vars)
}

fn next_token_loss(m: &Gemma, input: &Tensor) -> Tensor {
    let logits = m.forward(input, 0, None, None).unwrap();
    let (b, s, v) = logits.dims3().unwrap();
    let pred = logits
        .narrow(1, 0, s - 1)
        .unwrap()
        .reshape((b * (s - 1), v))
        .unwrap();
    let target = input.narrow(1, 1, s - 1).unwrap().flatten_all().unwrap();
    candle_nn::loss::cross_entropy(&pred, &target).unwrap()
}

#[test]
fn gradients_flow_to_every_linear_and_match_torch() {
    for name in ["gemma2", "gemma3"] {
        let (m, vars) = trainable(name);
        assert_eq!(m.trainable_vars().len(), vars.len());
        assert_eq!(vars.len(), 7 * m.config().num_hidden_layers);
        let r = reference(name);
        let loss = next_token_loss(&m, &ids(&r, "input_ids"));
        let want_loss = r["loss"].to_vec1::<f32>().unwrap()[0];
        let got_loss = loss.to_scalar::<f32>().unwrap();
        assert!(
            (got_loss - want_loss).abs() <= 1e-4,
            "{name}: loss {got_loss} vs torch {want_loss}"
        );

        let grads = loss.backward().unwrap();
        for (n, v) in &vars {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {n}"));
            let vals = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(vals.iter().all(|x| x.is_finite()), "{name}: {n} non-finite");
            assert!(vals.iter().any(|&x| x != 0.0), "{name}: {n} all zero");
        }
        let (_, q0) = vars
            .iter()
            .find(|(n, _)| n == "model.layers.0.self_attn.q_proj.weight")
            .unwrap();
        let g = grads.get(q0.as_tensor()).unwrap();
        let want = &r["grad_q_proj_0"];
        let d = max_abs_diff(g, want);
        let rel = d / max_abs(want);
        println!("{name}: loss {got_loss:.6} (torch {want_loss:.6}), q_proj.0 grad max |d| {d:.3e} (rel {rel:.3e})");
        assert!(
            rel <= 1e-4,
            "{name}: q_proj grad differs from torch by {d} (rel {rel})"
        );
    }
}

#[test]
fn a_gradient_step_lowers_the_loss() {
    let (m, vars) = trainable("gemma3");
    let r = reference("gemma3");
    let input = ids(&r, "input_ids");
    let before = next_token_loss(&m, &input);
    let grads = before.backward().unwrap();
    for (_, v) in &vars {
        let g = grads.get(v.as_tensor()).unwrap();
        v.set(&(v.as_tensor() - (g * 0.05).unwrap()).unwrap())
            .unwrap();
    }
    let after = next_token_loss(&m, &input).to_scalar::<f32>().unwrap();
    let before = before.to_scalar::<f32>().unwrap();
    assert!(after < before, "loss {before} -> {after}");
}

/// Multimodal Gemma-3 checkpoints nest the text config and prefix the decoder's tensors.
#[test]
fn multimodal_gemma3_layouts_load() {
    let text_config = read_json(&fixture("gemma3").join("config.json"));
    let config = serde_json::json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "eos_token_id": [1, 106],
        "text_config": text_config,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8},
    });
    for prefix in ["language_model.model.", "model.language_model."] {
        let dir = tempfile::tempdir().unwrap();
        write_json(&dir.path().join("config.json"), &config);
        let mut renamed: HashMap<String, Tensor> = weights("gemma3")
            .into_iter()
            .map(|(k, v)| (k.replacen("model.", prefix, 1), v))
            .collect();
        // A vision tower the text loader must ignore.
        renamed.insert(
            "vision_tower.vision_model.post_layernorm.weight".into(),
            Tensor::ones(8, DType::F32, &Device::Cpu).unwrap(),
        );
        save(&renamed, &dir.path().join("model.safetensors"));
        let m = load_gemma(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(m.config().eos_token_ids, vec![1, 106]);
        check_logits(&m, "gemma3", prefix);
    }
}

#[test]
fn sharded_checkpoint_loads_through_the_index() {
    let all = weights("gemma2");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("gemma2").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    for (k, v) in all {
        let i = usize::from(k.contains("layers.1.") || k.contains("norm.weight"));
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        weight_map.insert(k.clone(), file.into());
        shards[i].insert(k, v);
    }
    for (i, s) in shards.iter().enumerate() {
        assert!(!s.is_empty());
        save(
            s,
            &dir.path()
                .join(format!("model-0000{}-of-00002.safetensors", i + 1)),
        );
    }
    write_json(
        &dir.path().join("model.safetensors.index.json"),
        &serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map}),
    );
    let m = load_gemma(dir.path(), &Device::Cpu).unwrap();
    check_logits(&m, "gemma2", "2 shards");
}

#[test]
fn f32_checkpoint_gives_identical_logits() {
    // The fixture is bf16; storing the same values as f32 must change nothing.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("gemma2").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let f32s: HashMap<String, Tensor> = weights("gemma2")
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
        .collect();
    assert!(weights("gemma2").values().all(|t| t.dtype() == DType::BF16));
    save(&f32s, &dir.path().join("model.safetensors"));
    let a = load_gemma(dir.path(), &Device::Cpu).unwrap();
    let b = load_gemma(&fixture("gemma2"), &Device::Cpu).unwrap();
    let r = reference("gemma2");
    let x = ids(&r, "input_ids");
    let la = a.forward(&x, 0, None, None).unwrap();
    let lb = b.forward(&x, 0, None, None).unwrap();
    assert_eq!(max_abs_diff(&la, &lb), 0.0);
    // Sanity: the logits are not degenerate.
    let spread = la
        .max(D::Minus1)
        .unwrap()
        .sub(&la.min(D::Minus1).unwrap())
        .unwrap();
    assert!(spread.min_all().unwrap().to_scalar::<f32>().unwrap() > 1.0);
}
