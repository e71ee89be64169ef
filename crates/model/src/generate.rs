//! Batched generation over token-id prompts: left padding with an attention mask and per-row
//! positions, one prefill, then single-token decode steps through a preallocated [`KvCache`];
//! greedy, temperature and nucleus (top-p) sampling with a seeded, platform-independent RNG;
//! per-row stop on any stop id or on `max_new_tokens`.
//!
//! Finished rows leave the batch: their cache rows are dropped ([`KvCache::select_rows`], one
//! copy of each buffer on a step where some row finished), so a decode step costs what the
//! live rows need, and no step is spent on output that would be thrown away. Each prompt
//! samples from its own RNG stream (seed, prompt index), so its tokens do not depend on which
//! other prompts share the batch or when they finish.
//!
//! Text in and out (tokenizer, chat template, code extraction) is the caller's business; see
//! `rupantor_exec::extract_code` for the latter.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::ModelConfig;
use crate::gemma::Gemma;

/// How to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    /// Tokens to sample per prompt at most, a sampled stop id included.
    pub max_new_tokens: usize,
    /// Softmax temperature; `0.0` is greedy (argmax, lowest id on ties).
    pub temperature: f64,
    /// Nucleus mass in `[0, 1]`: sample among the most likely tokens whose probabilities first
    /// reach `top_p` of the total (at least one token, so `0.0` is greedy). `1.0`: all tokens.
    pub top_p: f64,
    /// Seed of the sampling RNG (ChaCha8; prompt `i` uses stream `i`).
    pub seed: u64,
    /// Sampling any of these ends the row; the stop id is reported, not appended.
    pub stop_ids: Vec<u32>,
    /// Prefill in forward calls of at most this many positions (`0`: the whole prompt in one
    /// call). Bounds the `[batch, heads, chunk, prompt]` attention scores of long prompts.
    pub prefill_chunk: usize,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_ids: Vec::new(),
            prefill_chunk: 0,
        }
    }
}

impl GenerateConfig {
    /// Greedy decoding of at most `max_new_tokens`, stopping on `stop_ids`.
    pub fn greedy(max_new_tokens: usize, stop_ids: Vec<u32>) -> Self {
        Self {
            max_new_tokens,
            stop_ids,
            ..Self::default()
        }
    }

    /// Adds the model's eos ids (config.json `eos_token_id`, which for Gemma-3 already holds
    /// `<end_of_turn>`) to the stop ids. The chat turn end `<end_of_turn>` comes from the
    /// tokenizer (`eot_id`) and should be added too.
    pub fn with_eos_of(mut self, cfg: &ModelConfig) -> Self {
        for &id in &cfg.eos_token_ids {
            if !self.stop_ids.contains(&id) {
                self.stop_ids.push(id);
            }
        }
        self
    }

    fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            candle_core::bail!(
                "temperature must be finite and >= 0, got {}",
                self.temperature
            );
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            candle_core::bail!("top_p must be in [0, 1], got {}", self.top_p);
        }
        Ok(())
    }
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// It sampled this stop id (not included in `tokens`).
    StopToken(u32),
    /// It reached `max_new_tokens`.
    MaxTokens,
    /// The caller's stop check ([`generate_until`]) ended it after its last token.
    Stopped,
}

/// One prompt's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// Sampled tokens, without the prompt and without the stop id.
    pub tokens: Vec<u32>,
    pub stop_reason: StopReason,
}

/// Progress of one [`generate`] call, reported after the prefill and after every decode step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenStats {
    /// Prompts in the call.
    pub batch: usize,
    /// Rows still generating.
    pub active: usize,
    /// Real prompt tokens prefilled (padding not counted).
    pub prefill_tokens: usize,
    /// Padded positions prefilled (`batch * longest prompt`): the work actually done.
    pub prefill_positions: usize,
    pub prefill_secs: f64,
    /// Tokens sampled so far over all rows, stop ids included.
    pub generated_tokens: usize,
    /// Decode steps so far (forward calls after the prefill).
    pub decode_steps: usize,
    /// Row-steps of those calls: the tokens decoded (each yields the next token's logits).
    pub decode_tokens: usize,
    pub decode_secs: f64,
}

impl GenStats {
    /// Real prompt tokens per second of prefill.
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        rate(self.prefill_tokens, self.prefill_secs)
    }

    /// Decoded tokens per second, over all rows of the batch.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        rate(self.decode_tokens, self.decode_secs)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Generates a continuation of every prompt (token ids, `<bos>` and chat template included)
/// in one batch. `progress` gets the running [`GenStats`] after the prefill and after each
/// decode step; its last call has `active == 0`.
pub fn generate(
    model: &Gemma,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    progress: impl FnMut(GenStats),
) -> Result<Vec<Generation>> {
    generate_until(model, prompts, cfg, progress, |_, _| false)
}

/// [`generate`], and a row also ends when `stop(prompt index, its tokens so far)` returns
/// true after a token was appended (its tokens are kept; [`StopReason::Stopped`]). What a stop
/// id or `max_new_tokens` cannot express — a program that starts over — ends here without
/// costing the rest of the token budget.
pub fn generate_until(
    model: &Gemma,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    mut progress: impl FnMut(GenStats),
    mut stop: impl FnMut(usize, &[u32]) -> bool,
) -> Result<Vec<Generation>> {
    cfg.validate()?;
    let vocab = model.config().vocab_size;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            candle_core::bail!("prompt {i} is empty: it needs at least one token (<bos>)");
        }
        if let Some(&t) = p.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!("prompt {i} holds token id {t}, outside the vocabulary of {vocab}");
        }
    }
    let b = prompts.len();
    let mut out: Vec<Generation> = (0..b)
        .map(|_| Generation {
            tokens: Vec::new(),
            stop_reason: StopReason::MaxTokens,
        })
        .collect();
    if b == 0 || cfg.max_new_tokens == 0 {
        return Ok(out);
    }

    let dev = model.device();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    // Rows still generating, as indices into `prompts`, in batch order, with their padding.
    let mut rows: Vec<usize> = (0..b).collect();
    let mut pad: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let mut rngs: Vec<ChaCha8Rng> = (0..b)
        .map(|i| {
            let mut r = ChaCha8Rng::seed_from_u64(cfg.seed);
            r.set_stream(i as u64);
            r
        })
        .collect();
    let pad_id = model.config().pad_token_id.unwrap_or(0);
    // The last sampled token is never fed back.
    let mut cache = model.new_cache_with_capacity(longest + cfg.max_new_tokens - 1);
    let mut stats = GenStats {
        batch: b,
        active: b,
        prefill_tokens: prompts.iter().map(Vec::len).sum(),
        prefill_positions: b * longest,
        ..GenStats::default()
    };

    // Prefill.
    let t0 = Instant::now();
    let padded: Vec<u32> = prompts
        .iter()
        .zip(&pad)
        .flat_map(|(p, &n)| std::iter::repeat_n(pad_id, n).chain(p.iter().copied()))
        .collect();
    let ids = Tensor::from_vec(padded, (b, longest), dev)?;
    let chunk = if cfg.prefill_chunk == 0 {
        longest
    } else {
        cfg.prefill_chunk
    };
    let mut at = 0;
    let mut logits = loop {
        let n = chunk.min(longest - at);
        let x = ids.narrow(1, at, n)?;
        let mask = attention_mask(&pad, at + n, dev)?;
        let h = model.forward_hidden_padded(&x, at, &pad, Some(&mut cache), mask.as_ref())?;
        at += n;
        if at == longest {
            break last_logits(model, &h)?;
        }
    };
    stats.prefill_secs = t0.elapsed().as_secs_f64();
    progress(stats);

    // Decode.
    let t0 = Instant::now();
    let mut pos = longest;
    loop {
        let mut next = Vec::with_capacity(rows.len());
        let mut keep = Vec::with_capacity(rows.len());
        for (i, &r) in rows.iter().enumerate() {
            let t = sample(&logits[i], cfg.temperature, cfg.top_p, &mut rngs[r]);
            stats.generated_tokens += 1;
            if cfg.stop_ids.contains(&t) {
                out[r].stop_reason = StopReason::StopToken(t);
                continue;
            }
            out[r].tokens.push(t);
            if out[r].tokens.len() == cfg.max_new_tokens {
                out[r].stop_reason = StopReason::MaxTokens;
                continue;
            }
            if stop(r, &out[r].tokens) {
                out[r].stop_reason = StopReason::Stopped;
                continue;
            }
            next.push(t);
            keep.push(i);
        }
        if keep.len() < rows.len() {
            if keep.is_empty() {
                break;
            }
            cache.select_rows(&keep)?;
            rows = keep.iter().map(|&i| rows[i]).collect();
            pad = keep.iter().map(|&i| pad[i]).collect();
        }
        let n = rows.len();
        let x = Tensor::from_vec(next, (n, 1), dev)?;
        let mask = attention_mask(&pad, pos + 1, dev)?;
        let h = model.forward_hidden_padded(&x, pos, &pad, Some(&mut cache), mask.as_ref())?;
        logits = last_logits(model, &h)?;
        pos += 1;
        stats.active = n;
        stats.decode_steps += 1;
        stats.decode_tokens += n;
        stats.decode_secs = t0.elapsed().as_secs_f64();
        progress(stats);
    }
    stats.active = 0;
    stats.decode_secs = t0.elapsed().as_secs_f64();
    progress(stats);
    Ok(out)
}

/// `[rows, len]` mask, 0 over each row's left padding; `None` when no row is padded.
fn attention_mask(pad: &[usize], len: usize, dev: &Device) -> Result<Option<Tensor>> {
    if pad.iter().all(|&p| p == 0) {
        return Ok(None);
    }
    let m: Vec<f32> = pad
        .iter()
        .flat_map(|&p| (0..len).map(move |j| if j < p { 0.0 } else { 1.0 }))
        .collect();
    Tensor::from_vec(m, (pad.len(), len), dev).map(Some)
}

/// Logits of the last position of every row, in f32 on the host: `[rows][vocab]`.
fn last_logits(model: &Gemma, hidden: &Tensor) -> Result<Vec<Vec<f32>>> {
    let s = hidden.dim(1)?;
    model
        .logits(&hidden.narrow(1, s - 1, 1)?)?
        .squeeze(1)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()
}

/// A uniform draw in `[0, 1)` with 53 random bits.
fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Index of the largest logit (the lowest on ties; NaN never wins, all NaN gives 0).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || (logits[best].is_nan() && !l.is_nan()) {
            best = i;
        }
    }
    best as u32
}

/// Tokens whose scaled logit is this far below the best are never drawn: each has probability
/// below `e^-50` (2e-22) relative to the top, so skipping them keeps a 256k vocabulary cheap.
const LOG_CUTOFF: f64 = -50.0;

/// Draws one token: greedy when `temperature == 0`, else from `softmax(logits / temperature)`
/// restricted to the nucleus of mass `top_p`.
fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut ChaCha8Rng) -> u32 {
    let best = argmax(logits);
    if temperature == 0.0 {
        return best;
    }
    let max = logits[best as usize] as f64;
    // (id, unnormalised probability) in id order; NaN logits drop out.
    let cand: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter_map(|(i, &l)| {
            let z = (l as f64 - max) / temperature;
            (z > LOG_CUTOFF).then(|| (i as u32, z.exp()))
        })
        .collect();
    if cand.is_empty() {
        return best; // every logit NaN or infinite
    }
    let draw = |cand: &[(u32, f64)], mass: f64, rng: &mut ChaCha8Rng| {
        let mut u = uniform(rng) * mass;
        for &(i, p) in cand {
            if u < p {
                return i;
            }
            u -= p;
        }
        cand[0].0 // only reached through rounding at the very top of the range
    };
    let total: f64 = cand.iter().map(|c| c.1).sum();
    if top_p >= 1.0 {
        return draw(&cand, total, rng);
    }
    // The nucleus: the fewest most likely tokens reaching top_p of the mass. Look at the top k
    // (a linear-time selection under a total order: probability down, then id up), doubling k
    // until they hold enough; only those are sorted.
    let by_prob = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let target = top_p * total;
    let mut k = 64.min(cand.len());
    loop {
        let mut top = cand.clone();
        if k < top.len() {
            top.select_nth_unstable_by(k - 1, by_prob);
            top.truncate(k);
        }
        top.sort_unstable_by(by_prob);
        let mut mass = 0.0;
        let mut n = 0;
        while n < top.len() && (n == 0 || mass < target) {
            mass += top[n].1;
            n += 1;
        }
        if mass >= target || k == cand.len() {
            return draw(&top[..n], mass, rng);
        }
        k = (2 * k).min(cand.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, 0.5]), 2);
        assert_eq!(argmax(&[-2.0]), 0);
    }

    #[test]
    fn tiny_top_p_and_zero_temperature_are_greedy() {
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect();
        let best = argmax(&logits);
        let mut r = rng(1);
        for _ in 0..50 {
            assert_eq!(sample(&logits, 0.0, 1.0, &mut r), best);
            assert_eq!(sample(&logits, 1.5, 0.0, &mut r), best);
            assert_eq!(sample(&logits, 1.5, 1e-9, &mut r), best);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = (0.5, 0.25, 0.125, 0.125) at temperature 1.
        let logits = [0.0f32, -(2f32.ln()), -(4f32.ln()), -(4f32.ln())];
        let mut r = rng(7);
        let mut counts = [0usize; 4];
        let n = 40_000;
        for _ in 0..n {
            counts[sample(&logits, 1.0, 1.0, &mut r) as usize] += 1;
        }
        for (c, p) in counts.iter().zip([0.5, 0.25, 0.125, 0.125]) {
            let f = *c as f64 / n as f64;
            assert!((f - p).abs() < 0.01, "{counts:?}");
        }
        // top_p 0.7: the nucleus is {0, 1} (0.5 < 0.7 <= 0.75), renormalised to (2/3, 1/3).
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[sample(&logits, 1.0, 0.7, &mut r) as usize] += 1;
        }
        assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
        let f = counts[0] as f64 / n as f64;
        assert!((f - 2.0 / 3.0).abs() < 0.01, "{counts:?}");
        // A low temperature sharpens: p(0) = 0.5^4 / (0.5^4 + 0.25^4 + 2 * 0.125^4) ~ 0.94.
        let hits = (0..n)
            .filter(|_| sample(&logits, 0.25, 1.0, &mut r) == 0)
            .count();
        let want = 0.0625 / (0.0625 + 0.25f64.powi(4) + 2.0 * 0.125f64.powi(4));
        assert!((hits as f64 / n as f64 - want).abs() < 0.01);
    }

    #[test]
    fn nan_and_negligible_logits_are_never_drawn() {
        let logits = [f32::NAN, 1.0, 1.0, -60.0, f32::NAN];
        let mut r = rng(5);
        let mut seen = [0usize; 5];
        for _ in 0..2000 {
            seen[sample(&logits, 1.0, 1.0, &mut r) as usize] += 1;
        }
        assert_eq!((seen[0], seen[3], seen[4]), (0, 0, 0), "{seen:?}");
        assert!(seen[1] > 800 && seen[2] > 800, "{seen:?}");
        assert_eq!(sample(&[f32::NAN; 3], 1.0, 0.5, &mut r), 0);
    }

    #[test]
    fn nucleus_grows_past_the_first_candidates() {
        // 10k equally likely tokens: the top-64 window must double until it holds 90%.
        let logits = vec![0.0f32; 10_000];
        let mut r = rng(3);
        let draws: Vec<u32> = (0..200)
            .map(|_| sample(&logits, 1.0, 0.9, &mut r))
            .collect();
        // Ties break by id, so the nucleus is ids 0..9000.
        assert!(draws.iter().all(|&t| t < 9000));
        assert!(draws.iter().any(|&t| t >= 6000));
    }

    #[test]
    fn rng_streams_are_fixed() {
        // ChaCha8 with a value-stability promise: these numbers must never change, or seeded
        // outputs written elsewhere would silently stop reproducing.
        let mut a = rng(42);
        let first: Vec<u64> = (0..2).map(|_| a.next_u64()).collect();
        assert_eq!(first, [12578764544318200737, 17529487244874322312]);
        let mut b = rng(42);
        assert_eq!(first, (0..2).map(|_| b.next_u64()).collect::<Vec<_>>());
        let mut c = rng(42);
        c.set_stream(1);
        assert_ne!(first[0], c.next_u64());
    }

    #[test]
    fn bad_configs_are_errors() {
        let bad = [
            GenerateConfig {
                temperature: -1.0,
                ..Default::default()
            },
            GenerateConfig {
                temperature: f64::NAN,
                ..Default::default()
            },
            GenerateConfig {
                top_p: 1.5,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
        assert!(GenerateConfig::default().validate().is_ok());
    }

    #[test]
    fn attention_mask_marks_left_padding() -> Result<()> {
        assert!(attention_mask(&[0, 0], 4, &Device::Cpu)?.is_none());
        let m = attention_mask(&[2, 0], 4, &Device::Cpu)?.unwrap();
        assert_eq!(
            m.to_vec2::<f32>()?,
            vec![vec![0.0, 0.0, 1.0, 1.0], vec![1.0; 4]]
        );
        Ok(())
    }
}
