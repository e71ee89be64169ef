//! Batched generation on the tiny fixtures of scripts/fixtures/gemma_tiny_generate.py (the
//! gemma_tiny models with an untied random lm_head, so the next token depends on the context):
//! cached, padded, batched decoding must pick the same tokens as HF transformers' `generate`
//! and as a plain forward pass over the whole sequence, row by row.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use rupantor_model::{
    generate, generate_until, Gemma, GenStats, GenerateConfig, Generation, StopReason,
};

const STEPS: usize = 20;

fn dir(name: &str) -> PathBuf {
    common::fixture(name)
        .join("../../gemma_tiny_generate")
        .join(name)
}

fn model(name: &str) -> Gemma {
    rupantor_model::load_gemma(&dir(name), &Device::Cpu).unwrap()
}

fn hf(name: &str) -> HashMap<String, Vec<Vec<u32>>> {
    candle_core::safetensors::load(dir(name).join("generate.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap()))
        .collect()
}

/// The fixture's prompts, unpadded: lengths 3, 9, 12, 1, 5 (one longer than the window of 8).
fn prompts(name: &str) -> Vec<Vec<u32>> {
    let r = hf(name);
    r["prompt_ids"]
        .iter()
        .zip(&r["prompt_mask"])
        .map(|(ids, mask)| {
            ids.iter()
                .zip(mask)
                .filter(|(_, &m)| m != 0)
                .map(|(&t, _)| t)
                .collect()
        })
        .collect()
}

fn run(m: &Gemma, prompts: &[Vec<u32>], cfg: &GenerateConfig) -> Vec<Generation> {
    generate(m, prompts, cfg, |_| {}).unwrap()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy decoding the slow way: a full forward pass over prompt + output for every token.
fn recompute_greedy(m: &Gemma, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut toks = prompt.to_vec();
    for _ in 0..n {
        let x = Tensor::new(toks.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = m.forward(&x, 0, None, None).unwrap();
        let last = logits
            .get(0)
            .unwrap()
            .get(toks.len() - 1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        toks.push(argmax(&last));
    }
    toks[prompt.len()..].to_vec()
}

#[test]
fn greedy_batch_matches_hf_generate_token_for_token() {
    for name in ["gemma2", "gemma3"] {
        let m = model(name);
        assert!(!m.config().tie_word_embeddings);
        let r = hf(name);
        let ps = prompts(name);
        assert_eq!(
            ps.iter().map(Vec::len).collect::<Vec<_>>(),
            [3, 9, 12, 1, 5]
        );
        let n = r["generated"][0].len();
        let got = run(&m, &ps, &GenerateConfig::greedy(n, vec![]));
        for (i, g) in got.iter().enumerate() {
            assert_eq!(g.tokens, r["generated"][i], "{name}: row {i} (batched)");
            assert_eq!(g.tokens, r["alone"][i], "{name}: row {i} (HF alone)");
        }
        // Chunked prefill (chunks of 5 over the 12-token padded prompt) changes nothing.
        let cfg = GenerateConfig {
            prefill_chunk: 5,
            ..GenerateConfig::greedy(n, vec![])
        };
        assert_eq!(run(&m, &ps, &cfg), got, "{name}: chunked prefill");
    }
}

#[test]
fn greedy_generation_equals_full_recomputation() {
    for name in ["gemma2", "gemma3"] {
        let m = model(name);
        let window = m.config().sliding_window;
        for prompt in prompts(name) {
            // Generating past the window makes the sliding layers' ring buffers wrap.
            assert!(prompt.len() + STEPS > 2 * window);
            let want = recompute_greedy(&m, &prompt, STEPS);
            for chunk in [0, 4] {
                let cfg = GenerateConfig {
                    prefill_chunk: chunk,
                    ..GenerateConfig::greedy(STEPS, vec![])
                };
                let got = run(&m, std::slice::from_ref(&prompt), &cfg);
                assert_eq!(
                    got[0].tokens, want,
                    "{name} prompt {prompt:?} chunk {chunk}"
                );
                assert_eq!(got[0].stop_reason, StopReason::MaxTokens);
            }
            // Not a degenerate model that repeats one token forever.
            let mut distinct = want.clone();
            distinct.sort();
            distinct.dedup();
            assert!(distinct.len() > 3, "{name}: {want:?}");
        }
    }
}

#[test]
fn left_padded_batch_generates_what_each_prompt_generates_alone() {
    for name in ["gemma2", "gemma3"] {
        let m = model(name);
        let ps = prompts(name);
        for chunk in [0, 5] {
            let cfg = GenerateConfig {
                prefill_chunk: chunk,
                ..GenerateConfig::greedy(STEPS, vec![])
            };
            let batched = run(&m, &ps, &cfg);
            assert_eq!(batched.len(), ps.len());
            for (p, b) in ps.iter().zip(&batched) {
                let alone = run(&m, std::slice::from_ref(p), &cfg);
                assert_eq!(b, &alone[0], "{name} chunk {chunk}: prompt {p:?}");
                assert_eq!(b.tokens.len(), STEPS);
            }
        }
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_top_p_zero_is_greedy() {
    for name in ["gemma2", "gemma3"] {
        let m = model(name);
        let ps = prompts(name);
        let sampled = |seed: u64, top_p: f64| {
            let cfg = GenerateConfig {
                max_new_tokens: STEPS,
                temperature: 1.0,
                top_p,
                seed,
                ..GenerateConfig::default()
            };
            run(&m, &ps, &cfg)
        };
        let a = sampled(11, 0.9);
        assert_eq!(a, sampled(11, 0.9), "{name}: same seed, different tokens");
        assert_ne!(a, sampled(12, 0.9), "{name}: the seed is ignored");
        let greedy = run(&m, &ps, &GenerateConfig::greedy(STEPS, vec![]));
        assert_ne!(a, greedy, "{name}: temperature 1 sampled the greedy path");
        assert_eq!(sampled(11, 0.0), greedy, "{name}: top_p 0 is not greedy");
        // Each prompt has its own RNG stream: alone (as prompt 0 of a batch of one) it would
        // use stream 0, so compare within the stream instead: batch order is irrelevant to
        // the first prompt, and dropping later prompts changes nothing for it.
        let cfg = GenerateConfig {
            max_new_tokens: STEPS,
            temperature: 1.0,
            top_p: 0.9,
            seed: 11,
            ..GenerateConfig::default()
        };
        let first_alone = run(&m, &ps[..1], &cfg);
        assert_eq!(
            first_alone[0], a[0],
            "{name}: a row depends on its neighbours"
        );
        let first_two = run(&m, &ps[..2], &cfg);
        assert_eq!(
            first_two[..],
            a[..2],
            "{name}: a row depends on its neighbours"
        );
    }
}

#[test]
fn stop_ids_end_rows_and_are_reported() {
    for name in ["gemma2", "gemma3"] {
        let m = model(name);
        let ps = prompts(name);
        let free = run(&m, &ps, &GenerateConfig::greedy(STEPS, vec![]));
        // A stop id that first appears mid-way through row 1's output.
        let (k, stop) = free[1]
            .tokens
            .iter()
            .enumerate()
            .skip(3)
            .find(|&(k, t)| !free[1].tokens[..k].contains(t))
            .map(|(k, &t)| (k, t))
            .unwrap();
        let cfg = GenerateConfig::greedy(STEPS, vec![stop, 255]);
        let mut calls = Vec::<GenStats>::new();
        let got = generate(&m, &ps, &cfg, |s| calls.push(s)).unwrap();
        assert_eq!(got[1].tokens, free[1].tokens[..k]);
        assert_eq!(got[1].stop_reason, StopReason::StopToken(stop));
        // Every row ends at its first stop id, or runs to max_new_tokens without one.
        for (g, f) in got.iter().zip(&free) {
            match f.tokens.iter().position(|t| cfg.stop_ids.contains(t)) {
                Some(at) => {
                    assert_eq!(g.tokens, f.tokens[..at]);
                    assert_eq!(g.stop_reason, StopReason::StopToken(f.tokens[at]));
                }
                None => assert_eq!(g, f),
            }
        }
        // Stats: one call after the prefill, one per decode step, a final one.
        let last = *calls.last().unwrap();
        assert_eq!(last.active, 0);
        assert_eq!(last.batch, ps.len());
        assert_eq!(calls.len(), last.decode_steps + 2);
        assert_eq!(last.prefill_tokens, ps.iter().map(Vec::len).sum::<usize>());
        assert_eq!(last.prefill_positions, ps.len() * 12);
        let sampled: Vec<usize> = got
            .iter()
            .map(|g| g.tokens.len() + usize::from(g.stop_reason != StopReason::MaxTokens))
            .collect();
        assert_eq!(last.generated_tokens, sampled.iter().sum::<usize>());
        // The last token of each row is sampled but never fed back.
        assert_eq!(
            last.decode_tokens,
            sampled.iter().map(|n| n - 1).sum::<usize>()
        );
        assert_eq!(last.decode_steps, sampled.iter().max().unwrap() - 1);
        // Rows leave the batch as they finish.
        assert!(calls.windows(2).all(|w| w[1].active <= w[0].active));
        assert!(last.prefill_tokens_per_sec() > 0.0 && last.decode_tokens_per_sec() > 0.0);
    }
}

#[test]
fn a_stop_check_ends_its_row_after_the_token_it_saw() {
    let m = model("gemma2");
    let ps = prompts("gemma2");
    let cfg = GenerateConfig::greedy(12, vec![]);
    let full = run(&m, &ps, &cfg);
    // Row 0 stops once it holds 3 tokens; the others run on, unchanged.
    let got = generate_until(
        &m,
        &ps,
        &cfg,
        |_| {},
        |row, toks| row == 0 && toks.len() == 3,
    )
    .unwrap();
    assert_eq!(got[0].tokens, full[0].tokens[..3]);
    assert_eq!(got[0].stop_reason, StopReason::Stopped);
    for (g, f) in got.iter().zip(&full).skip(1) {
        assert_eq!(g, f);
    }
}

#[test]
fn max_new_tokens_and_edge_cases() {
    let m = model("gemma3");
    let ps = prompts("gemma3");
    let got = run(&m, &ps, &GenerateConfig::greedy(1, vec![]));
    let full = run(&m, &ps, &GenerateConfig::greedy(STEPS, vec![]));
    for (g, f) in got.iter().zip(&full) {
        assert_eq!(g.tokens, f.tokens[..1]);
        assert_eq!(g.stop_reason, StopReason::MaxTokens);
    }
    let none = run(&m, &ps, &GenerateConfig::greedy(0, vec![]));
    assert!(none.iter().all(|g| g.tokens.is_empty()));
    assert!(run(&m, &[], &GenerateConfig::default()).is_empty());
    let cfg = GenerateConfig::greedy(4, vec![]);
    let e = generate(&m, &[vec![2], vec![]], &cfg, |_| {}).unwrap_err();
    assert!(e.to_string().contains("prompt 1 is empty"), "{e}");
    let e = generate(&m, &[vec![2, 999]], &cfg, |_| {}).unwrap_err();
    assert!(e.to_string().contains("token id 999"), "{e}");
    let cfg = cfg.with_eos_of(m.config());
    assert_eq!(cfg.stop_ids, m.config().eos_token_ids);
}

/// Throughput on the tiny models, for information (`--nocapture` shows it).
#[test]
fn report_tokens_per_second() {
    for name in ["gemma2", "gemma3"] {
        let m = model(name);
        let ps: Vec<Vec<u32>> = prompts(name).into_iter().cycle().take(8).collect();
        for batch in [1, 8] {
            let mut last = GenStats::default();
            let cfg = GenerateConfig::greedy(64, vec![]);
            generate(&m, &ps[..batch], &cfg, |s| last = s).unwrap();
            println!(
                "{name} batch {batch}: prefill {:.0} tok/s ({} tokens), decode {:.0} tok/s ({} tokens in {} steps)",
                last.prefill_tokens_per_sec(),
                last.prefill_tokens,
                last.decode_tokens_per_sec(),
                last.decode_tokens,
                last.decode_steps
            );
        }
    }
}
