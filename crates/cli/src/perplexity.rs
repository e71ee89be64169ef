//! `rupantor perplexity`: mean next-token NLL of a text file and its exponential, as
//! llama.cpp's `llama-perplexity` reports it.
//!
//! The text is tokenized without special handling, `<bos>` (config.json's `bos_token_id`) is
//! put in front as HF's Gemma tokenizers do, and every token after it is scored once:
//! `mean_nll = -1/T * sum_j log p(t_j | <bos>, t_<j)`, `perplexity = exp(mean_nll)`.
//!
//! Texts longer than the context window (`--context`, default the model's
//! `max_position_embeddings`) are scored in overlapping windows, each `<bos>` plus at most
//! `context - 1` text tokens, advancing by half a window: the first window scores all of its
//! tokens, each later one only the tokens no window scored before, so every token is scored
//! exactly once and (after the first window) with at least half a window of context. This is
//! the strided evaluation of HF's perplexity guide, with `<bos>` restored at the start of every
//! window because Gemma's attention relies on it.
//!
//! Inside a window the forward pass runs in chunks of positions through a KV cache, and logits
//! are formed for a few positions at a time, so neither `[context, context]` attention scores
//! nor `[context, vocab]` logits are ever held whole.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use rupantor_model::Gemma;

use crate::model_arg::{self, ModelArgs};
use crate::run_config::RunConfig;

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A TOML preset (configs/*.toml); flags override its [model] table.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The UTF-8 text to score.
    #[arg(long)]
    pub file: PathBuf,
    /// Window length in tokens, <bos> included [default: the model's max_position_embeddings].
    /// Longer texts are scored in overlapping windows advancing by half a window.
    #[arg(long)]
    pub context: Option<usize>,
    /// Make the last stdout line one JSON object {"mean_nll", "perplexity", "tokens"}.
    #[arg(long)]
    pub json: bool,
}

/// Positions per forward call inside a window.
const FORWARD_CHUNK: usize = 512;
/// Positions whose `[vocab]` logits are formed at once.
const LOGIT_CHUNK: usize = 64;

/// One window: `<bos>` + `t[start..end]`, scoring the targets `t[score_from..end]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub end: usize,
    pub score_from: usize,
}

/// The windows over `n` text tokens for a context of `context` positions (`<bos>` included).
pub fn windows(n: usize, context: usize) -> Vec<Window> {
    assert!(context >= 2, "a window needs <bos> and one token");
    let body = context - 1;
    let stride = (body / 2).max(1);
    let mut out = Vec::new();
    let mut end = n.min(body);
    let mut scored = 0;
    loop {
        out.push(Window {
            start: end.saturating_sub(body),
            end,
            score_from: scored,
        });
        scored = end;
        if end >= n {
            return out;
        }
        end = n.min(end + stride);
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    pub mean_nll: f64,
    pub perplexity: f64,
    /// Scored tokens (all text tokens, `<bos>` excluded).
    pub tokens: usize,
    pub windows: usize,
}

/// Scores `text_ids` (without `<bos>`) after `bos`; see the module docs.
pub fn perplexity(
    model: &Gemma,
    bos: u32,
    text_ids: &[u32],
    context: usize,
    forward_chunk: usize,
) -> Result<Perplexity> {
    if text_ids.is_empty() {
        bail!("the text has no tokens to score");
    }
    if context < 2 {
        bail!("--context must be at least 2 (<bos> and one token), got {context}");
    }
    let vocab = model.config().vocab_size;
    if let Some(&t) = text_ids.iter().find(|&&t| t as usize >= vocab) {
        bail!("token id {t} is outside the model's vocabulary of {vocab}");
    }
    let plan = windows(text_ids.len(), context);
    let mut total = 0f64;
    for w in &plan {
        let mut input = Vec::with_capacity(1 + w.end - w.start);
        input.push(bos);
        input.extend_from_slice(&text_ids[w.start..w.end]);
        total += window_nll(model, &input, w.score_from - w.start, forward_chunk.max(1))?;
    }
    let mean_nll = total / text_ids.len() as f64;
    Ok(Perplexity {
        mean_nll,
        perplexity: mean_nll.exp(),
        tokens: text_ids.len(),
        windows: plan.len(),
    })
}

/// Summed NLL of `input[p + 1]` given `input[..=p]` for every `p >= first_scored`.
fn window_nll(model: &Gemma, input: &[u32], first_scored: usize, chunk: usize) -> Result<f64> {
    let dev = model.device();
    let n = input.len();
    let mut cache = model.new_cache_with_capacity(n);
    let mut sum = 0f64;
    let mut at = 0;
    // The last position predicts nothing inside the window.
    while at < n - 1 {
        let len = chunk.min(n - at);
        let ids = Tensor::from_slice(&input[at..at + len], (1, len), dev)?;
        let hidden = model.forward_hidden(&ids, at, Some(&mut cache), None)?;
        // Positions at..at+len whose targets are scored.
        let lo = first_scored.max(at);
        let hi = (at + len).min(n - 1);
        let mut p = lo;
        while p < hi {
            let k = LOGIT_CHUNK.min(hi - p);
            let logits = model
                .logits(&hidden.narrow(1, p - at, k)?)?
                .squeeze(0)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            for (i, row) in logits.iter().enumerate() {
                sum += nll(row, input[p + i + 1] as usize);
            }
            p += k;
        }
        at += len;
    }
    Ok(sum)
}

/// `logsumexp(logits) - logits[target]`, accumulated in f64.
fn nll(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l)) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln() - logits[target] as f64
}

pub fn run(args: PerplexityArgs) -> Result<()> {
    let cfg = RunConfig::load(args.config.as_deref())?;
    let settings = cfg.model_settings(&args.model);
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let loaded = model_arg::load(&settings)?;
    let bos = loaded.bos_id()?;
    let ids = loaded.tokenizer.encode(&text, false);
    let context = args
        .context
        .unwrap_or(loaded.model.config().max_position_embeddings);
    eprintln!(
        "perplexity: {} ({}) loaded in {:.1}s; {} tokens after <bos>, context {context}",
        loaded.path.display(),
        loaded.form(settings.quant),
        loaded.load_secs,
        ids.len()
    );
    let t0 = std::time::Instant::now();
    let r = perplexity(&loaded.model, bos, &ids, context, FORWARD_CHUNK)?;
    let secs = t0.elapsed().as_secs_f64();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: mean NLL {:.6}, perplexity {:.4} over {} tokens ({} window{}, {:.0} tokens/s)",
        args.file.display(),
        r.mean_nll,
        r.perplexity,
        r.tokens,
        r.windows,
        if r.windows == 1 { "" } else { "s" },
        r.tokens as f64 / secs.max(1e-9)
    )?;
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({
                "mean_nll": r.mean_nll,
                "perplexity": r.perplexity,
                "tokens": r.tokens,
            })
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rupantor_model::{load_gemma, Tokenizer};
    use std::path::Path;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma_tiny/gemma3")
    }

    #[test]
    fn windows_score_every_token_once() {
        assert_eq!(
            windows(5, 512),
            [Window {
                start: 0,
                end: 5,
                score_from: 0
            }]
        );
        for (n, ctx) in [
            (1, 2),
            (10, 2),
            (10, 3),
            (57, 9),
            (64, 17),
            (100, 100),
            (101, 100),
        ] {
            let w = windows(n, ctx);
            let mut next = 0;
            for win in &w {
                assert!(win.end - win.start < ctx, "{n} {ctx} {win:?}");
                assert_eq!(win.score_from, next, "{n} {ctx} {w:?}");
                assert!(win.start <= win.score_from && win.score_from < win.end);
                next = win.end;
            }
            assert_eq!(next, n);
            // After the first window every scored token keeps half a window of context.
            for win in &w[1..] {
                assert!(win.score_from - win.start >= (ctx - 1) - ((ctx - 1) / 2).max(1));
            }
        }
    }

    /// The mean NLL straight from `Gemma::forward`'s full logits (one call, no cache).
    fn direct_nll_sum(model: &Gemma, input: &[u32], first_scored: usize) -> f64 {
        let ids = Tensor::from_slice(input, (1, input.len()), &Device::Cpu).unwrap();
        let logits = model
            .forward(&ids, 0, None, None)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        (first_scored..input.len() - 1)
            .map(|p| {
                let row = &logits[p];
                let lse = row.iter().map(|&l| (l as f64).exp()).sum::<f64>().ln();
                lse - row[input[p + 1] as usize] as f64
            })
            .sum()
    }

    #[test]
    fn matches_the_models_own_logits() {
        let model = load_gemma(&fixture(), &Device::Cpu).unwrap();
        let tok = Tokenizer::from_tokenizer_json(fixture().join("tokenizer.json")).unwrap();
        let bos = model.config().bos_token_id.unwrap();
        let ids = tok.encode(
            "def add(a, b):\n    return a + b\n# sum of two numbers",
            false,
        );
        assert!(ids.len() > 20, "{}", ids.len());
        let mut input = vec![bos];
        input.extend(&ids);
        let want = direct_nll_sum(&model, &input, 0) / ids.len() as f64;
        // One window; forward chunks of 3 positions through the KV cache, and of all of them.
        for chunk in [3, 512] {
            let got = perplexity(&model, bos, &ids, 512, chunk).unwrap();
            assert_eq!((got.tokens, got.windows), (ids.len(), 1));
            assert!(
                (got.mean_nll - want).abs() < 1e-5 * want.max(1.0),
                "chunk {chunk}: {} vs {want}",
                got.mean_nll
            );
            assert!((got.perplexity - want.exp()).abs() < 1e-4 * want.exp());
        }
        // Windows of 12 positions: each window's scored tokens against a direct forward of it.
        let want: f64 = windows(ids.len(), 12)
            .iter()
            .map(|w| {
                let mut input = vec![bos];
                input.extend(&ids[w.start..w.end]);
                direct_nll_sum(&model, &input, w.score_from - w.start)
            })
            .sum::<f64>()
            / ids.len() as f64;
        let got = perplexity(&model, bos, &ids, 12, 5).unwrap();
        assert!(got.windows > 2);
        assert!(
            (got.mean_nll - want).abs() < 1e-5 * want,
            "{} vs {want}",
            got.mean_nll
        );
    }

    #[test]
    fn empty_text_and_bad_context_are_errors() {
        let model = load_gemma(&fixture(), &Device::Cpu).unwrap();
        assert!(perplexity(&model, 2, &[], 512, 8).is_err());
        assert!(perplexity(&model, 2, &[5, 6], 1, 8).is_err());
        assert!(perplexity(&model, 2, &[5, 9999], 512, 8).is_err());
    }
}
