//! Supervised fine-tuning data: problems with reference programs become token ids and labels in
//! Gemma's chat format (design §2), split into a seeded validation slice and length-bucketed
//! micro-batches.
//!
//! * Each problem is `<bos><start_of_turn>user\n{instruction}<end_of_turn>\n<start_of_turn>model\n
//!   {response}<end_of_turn>\n`; the loss covers the response tokens and the closing
//!   `<end_of_turn>` only (labels are the ids there and `-100` elsewhere).
//! * A problem longer than `max_len` tokens is cut to its first `max_len` tokens and listed in
//!   the [`SftData::truncated`] report; if not one loss token survives the cut it cannot teach
//!   anything and is listed as excluded instead. Nothing is dropped without a line in the report.
//! * A problem without a reference response is an error naming its id: a training pool holds
//!   solved problems only.
//! * The validation slice is `max(ceil(fraction * n), min)` problems (never all of them), chosen
//!   by a seeded shuffle of the ids in ascending order, so it depends on the pool and the seed
//!   only, not on the order the problems came in.
//! * Micro-batches: the training examples sorted by length (ties by id) and cut into runs of
//!   `micro_batch`, so each batch pads to nearly its own length; the trainer shuffles the
//!   batch order every epoch.

use anyhow::{bail, ensure, Result};
use candle_core::{Device, Tensor};
use rupantor_data::Problem;
use rupantor_model::{ChatExample, Tokenizer, IGNORE_INDEX};
use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;

/// Turns a problem and its response into a chat-format training example.
pub trait ChatEncoder {
    /// Ids of the whole conversation and the loss mask (response + closing `<end_of_turn>`).
    fn encode_train(
        &self,
        instruction: &str,
        visible_tests: Option<&[String]>,
        response: &str,
    ) -> ChatExample;
    /// The id right-padding uses (its positions carry no loss and no real token sees them).
    fn pad_id(&self) -> u32;
}

impl ChatEncoder for Tokenizer {
    fn encode_train(
        &self,
        instruction: &str,
        visible_tests: Option<&[String]>,
        response: &str,
    ) -> ChatExample {
        self.encode_chat_train(instruction, visible_tests, response)
    }

    fn pad_id(&self) -> u32 {
        Tokenizer::pad_id(self).unwrap_or(0)
    }
}

/// How problems become training data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    /// Longest sequence in tokens; longer problems are cut and reported.
    pub max_len: usize,
    /// Put the problem's asserts in the user turn (design §2: off for training).
    pub visible_tests: bool,
    /// Share of the pool held out for validation.
    pub val_fraction: f64,
    /// Fewest validation problems.
    pub val_min: usize,
    /// Sequences per micro-batch.
    pub micro_batch: usize,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            max_len: 1024,
            visible_tests: false,
            val_fraction: 0.1,
            val_min: 4,
            micro_batch: 2,
        }
    }
}

/// One tokenized problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftExample {
    pub id: u64,
    pub ids: Vec<u32>,
    /// `ids` where the loss applies, [`IGNORE_INDEX`] elsewhere.
    pub labels: Vec<i64>,
}

impl SftExample {
    /// Positions whose prediction is trained (labels other than `-100` after the first).
    pub fn loss_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// A problem cut to `max_len`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truncation {
    pub id: u64,
    /// Length before the cut.
    pub tokens: usize,
    /// Loss tokens before and after the cut.
    pub loss_tokens: usize,
    pub kept_loss_tokens: usize,
    /// No loss token survived: the problem is not trained on.
    pub excluded: bool,
}

/// A micro-batch, right-padded to its longest sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Problem ids, in row order.
    pub problems: Vec<u64>,
    /// `[rows][len]`.
    pub ids: Vec<Vec<u32>>,
    pub labels: Vec<Vec<i64>>,
    /// Real (non-padding) tokens.
    pub tokens: usize,
    /// Positions carrying loss.
    pub loss_tokens: usize,
}

impl Batch {
    fn new(examples: &[&SftExample], pad: u32) -> Self {
        let len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(examples.len());
        let mut labels = Vec::with_capacity(examples.len());
        for e in examples {
            let mut row = e.ids.clone();
            row.resize(len, pad);
            ids.push(row);
            let mut l = e.labels.clone();
            l.resize(len, IGNORE_INDEX);
            labels.push(l);
        }
        Batch {
            problems: examples.iter().map(|e| e.id).collect(),
            ids,
            labels,
            tokens: examples.iter().map(|e| e.ids.len()).sum(),
            loss_tokens: examples.iter().map(|e| e.loss_tokens()).sum(),
        }
    }

    pub fn len(&self) -> usize {
        self.ids.first().map_or(0, Vec::len)
    }

    pub fn rows(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// `input_ids` `[rows, len]` u32 and `labels` `[rows, len]` i64 on `device`.
    pub fn tensors(&self, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, s) = (self.rows(), self.len());
        let ids: Vec<u32> = self.ids.concat();
        let labels: Vec<i64> = self.labels.concat();
        Ok((
            Tensor::from_vec(ids, (b, s), device)?,
            Tensor::from_vec(labels, (b, s), device)?,
        ))
    }
}

/// The tokenized pool.
#[derive(Debug, Clone, PartialEq)]
pub struct SftData {
    pub train: Vec<SftExample>,
    pub val: Vec<SftExample>,
    pub truncated: Vec<Truncation>,
    pub pad_id: u32,
}

/// The validation problem ids of a pool: `max(ceil(fraction * n), min)`, at most `n - 1`, by a
/// seeded shuffle of the sorted ids.
pub fn validation_ids(ids: &[u64], fraction: f64, min: usize, seed: u64) -> Result<Vec<u64>> {
    let n = ids.len();
    ensure!(
        (0.0..1.0).contains(&fraction),
        "validation fraction {fraction} is not in [0, 1)"
    );
    let want = ((fraction * n as f64).ceil() as usize).max(min);
    ensure!(
        want < n,
        "a pool of {n} problems cannot hold out {want} for validation and still train"
    );
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    let mut rng = SplitMix64::new(seed ^ 0x7A11_DA7E_5EED_0001);
    rng.shuffle(&mut sorted);
    sorted.truncate(want);
    sorted.sort_unstable();
    Ok(sorted)
}

impl SftData {
    /// Tokenizes `pool` and splits it; see the module docs.
    pub fn build(
        pool: &[Problem],
        encoder: &dyn ChatEncoder,
        cfg: &SftConfig,
        seed: u64,
    ) -> Result<Self> {
        ensure!(cfg.max_len >= 2, "max_len {} is too short", cfg.max_len);
        ensure!(cfg.micro_batch >= 1, "micro_batch must be at least 1");
        let mut seen = std::collections::HashSet::new();
        for p in pool {
            ensure!(
                seen.insert(p.id),
                "problem {} appears twice in the pool",
                p.id
            );
            match p.response.as_deref() {
                Some(r) if !r.trim().is_empty() => {}
                _ => bail!(
                    "problem {} has no reference response; a training pool holds solved problems",
                    p.id
                ),
            }
        }
        let ids: Vec<u64> = pool.iter().map(|p| p.id).collect();
        let val_ids = validation_ids(&ids, cfg.val_fraction, cfg.val_min, seed)?;
        let mut data = SftData {
            train: Vec::new(),
            val: Vec::new(),
            truncated: Vec::new(),
            pad_id: encoder.pad_id(),
        };
        for p in pool {
            let tests = cfg.visible_tests.then_some(p.test_list.as_slice());
            let ex = encoder.encode_train(
                &p.instruction,
                tests,
                p.response.as_deref().unwrap_or_default(),
            );
            ensure!(
                ex.ids.len() == ex.loss_mask.len(),
                "encoder gave {} ids but {} mask entries for problem {}",
                ex.ids.len(),
                ex.loss_mask.len(),
                p.id
            );
            let mut e = SftExample {
                id: p.id,
                labels: ex.labels(),
                ids: ex.ids,
            };
            if e.ids.len() > cfg.max_len {
                let (tokens, loss_tokens) = (e.ids.len(), e.loss_tokens());
                e.ids.truncate(cfg.max_len);
                e.labels.truncate(cfg.max_len);
                let kept = e.loss_tokens();
                data.truncated.push(Truncation {
                    id: p.id,
                    tokens,
                    loss_tokens,
                    kept_loss_tokens: kept,
                    excluded: kept == 0,
                });
                if kept == 0 {
                    continue;
                }
            }
            if val_ids.binary_search(&p.id).is_ok() {
                data.val.push(e);
            } else {
                data.train.push(e);
            }
        }
        ensure!(
            !data.train.is_empty(),
            "no training example is left (all {} cut away by max_len {})",
            data.truncated.len(),
            cfg.max_len
        );
        ensure!(
            !data.val.is_empty(),
            "no validation example is left after max_len {}",
            cfg.max_len
        );
        for set in [&mut data.train, &mut data.val] {
            set.sort_by_key(|e| (e.ids.len(), e.id));
        }
        Ok(data)
    }

    /// Length-bucketed micro-batches of `examples` (already sorted by length).
    pub fn batches(examples: &[SftExample], micro_batch: usize, pad: u32) -> Vec<Batch> {
        let refs: Vec<&SftExample> = examples.iter().collect();
        refs.chunks(micro_batch.max(1))
            .map(|c| Batch::new(c, pad))
            .collect()
    }

    pub fn train_batches(&self, micro_batch: usize) -> Vec<Batch> {
        Self::batches(&self.train, micro_batch, self.pad_id)
    }

    pub fn val_batches(&self, micro_batch: usize) -> Vec<Batch> {
        Self::batches(&self.val, micro_batch, self.pad_id)
    }

    /// One line per truncated problem, for logs and the run report.
    pub fn truncation_report(&self, max_len: usize) -> Vec<String> {
        self.truncated
            .iter()
            .map(|t| {
                if t.excluded {
                    format!(
                        "problem {}: {} tokens > max_len {max_len}; the prompt alone fills it, \
                         so it is excluded from training",
                        t.id, t.tokens
                    )
                } else {
                    format!(
                        "problem {}: {} tokens > max_len {max_len}; cut, {} of {} response \
                         tokens trained",
                        t.id, t.tokens, t.kept_loss_tokens, t.loss_tokens
                    )
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One id per byte of `{instruction}|` then per byte of the response, then an end token.
    struct Bytes;

    impl ChatEncoder for Bytes {
        fn encode_train(&self, ins: &str, tests: Option<&[String]>, resp: &str) -> ChatExample {
            let mut ids = vec![2u32];
            ids.extend(ins.bytes().map(u32::from));
            if let Some(t) = tests {
                ids.extend(t.concat().bytes().map(u32::from));
            }
            ids.push(u32::from(b'|'));
            let prompt_len = ids.len();
            ids.extend(resp.bytes().map(u32::from));
            ids.push(6);
            let n = ids.len();
            ids.push(7);
            ChatExample {
                loss_mask: (0..ids.len()).map(|i| i >= prompt_len && i < n).collect(),
                ids,
                prompt_len,
            }
        }
        fn pad_id(&self) -> u32 {
            0
        }
    }

    fn problem(id: u64, ins: &str, resp: &str) -> Problem {
        Problem {
            id,
            instruction: ins.into(),
            test_list: vec!["assert f() == 1".into()],
            response: Some(resp.into()),
        }
    }

    fn pool(n: u64) -> Vec<Problem> {
        (1..=n)
            .map(|i| {
                problem(
                    i,
                    &"x".repeat(i as usize % 7 + 1),
                    &"y".repeat(i as usize % 5 + 2),
                )
            })
            .collect()
    }

    #[test]
    fn validation_is_ten_percent_at_least_four_and_seeded() {
        let ids: Vec<u64> = (1..=74).collect();
        let v = validation_ids(&ids, 0.1, 4, 1).unwrap();
        assert_eq!(v.len(), 8); // ceil(7.4)
        assert_eq!(validation_ids(&ids, 0.1, 4, 1).unwrap(), v);
        assert_ne!(validation_ids(&ids, 0.1, 4, 2).unwrap(), v);
        // Order of the pool does not matter.
        let mut rev = ids.clone();
        rev.reverse();
        assert_eq!(validation_ids(&rev, 0.1, 4, 1).unwrap(), v);
        assert_eq!(validation_ids(&ids[..20], 0.1, 4, 1).unwrap().len(), 4);
        assert!(validation_ids(&ids[..4], 0.1, 4, 1).is_err());
    }

    #[test]
    fn labels_cover_response_and_end_of_turn_only() {
        let d = SftData::build(&pool(10), &Bytes, &SftConfig::default(), 0).unwrap();
        assert_eq!(d.val.len(), 4);
        assert_eq!(d.train.len(), 6);
        for e in d.train.iter().chain(&d.val) {
            let bar = e.ids.iter().position(|&t| t == u32::from(b'|')).unwrap();
            for (i, (&id, &l)) in e.ids.iter().zip(&e.labels).enumerate() {
                let trained = i > bar && i + 1 < e.ids.len();
                assert_eq!(l != IGNORE_INDEX, trained, "problem {} position {i}", e.id);
                if trained {
                    assert_eq!(l, i64::from(id));
                }
            }
            // The last trained label is the end-of-turn token.
            let last = e.labels.iter().rposition(|&l| l != IGNORE_INDEX).unwrap();
            assert_eq!(e.ids[last], 6);
        }
        assert!(d.truncated.is_empty());
    }

    #[test]
    fn long_problems_are_cut_or_excluded_and_always_reported() {
        let mut p = pool(12);
        p.push(problem(100, "ab", &"z".repeat(40))); // cut, some response kept
        p.push(problem(101, &"q".repeat(40), "r")); // the prompt fills max_len
        let cfg = SftConfig {
            max_len: 20,
            ..SftConfig::default()
        };
        let d = SftData::build(&p, &Bytes, &cfg, 3).unwrap();
        let t: Vec<_> = d.truncated.iter().map(|t| (t.id, t.excluded)).collect();
        assert_eq!(t, vec![(100, false), (101, true)]);
        let cut = &d.truncated[0];
        assert_eq!(cut.tokens, 46);
        assert_eq!(cut.loss_tokens, 41);
        assert_eq!(cut.kept_loss_tokens, 20 - 4); // positions 4..20
        let all: Vec<&SftExample> = d.train.iter().chain(&d.val).collect();
        assert!(all.iter().all(|e| e.ids.len() <= 20));
        assert!(all.iter().any(|e| e.id == 100));
        assert!(!all.iter().any(|e| e.id == 101));
        let report = d.truncation_report(20);
        assert!(report[0].contains("problem 100") && report[0].contains("16 of 41"));
        assert!(report[1].contains("problem 101") && report[1].contains("excluded"));
    }

    #[test]
    fn missing_responses_and_duplicates_are_errors() {
        let mut p = pool(8);
        p[3].response = None;
        let e = SftData::build(&p, &Bytes, &SftConfig::default(), 0).unwrap_err();
        assert!(e.to_string().contains("problem 4"), "{e}");
        let mut p = pool(8);
        p[5].id = 1;
        let e = SftData::build(&p, &Bytes, &SftConfig::default(), 0).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }

    #[test]
    fn batches_are_length_bucketed_and_right_padded() {
        let d = SftData::build(&pool(30), &Bytes, &SftConfig::default(), 0).unwrap();
        let b = d.train_batches(2);
        assert_eq!(b.len(), d.train.len().div_ceil(2));
        let lens: Vec<usize> = b.iter().map(Batch::len).collect();
        assert!(lens.windows(2).all(|w| w[0] <= w[1]), "{lens:?}");
        let total: usize = b.iter().map(|x| x.tokens).sum();
        assert_eq!(total, d.train.iter().map(|e| e.ids.len()).sum::<usize>());
        for batch in &b {
            for (row, pid) in batch.problems.iter().enumerate() {
                let e = d.train.iter().find(|e| e.id == *pid).unwrap();
                assert_eq!(&batch.ids[row][..e.ids.len()], e.ids.as_slice());
                assert!(batch.ids[row][e.ids.len()..].iter().all(|&t| t == 0));
                assert!(batch.labels[row][e.ids.len()..]
                    .iter()
                    .all(|&l| l == IGNORE_INDEX));
            }
            let (ids, labels) = batch.tensors(&Device::Cpu).unwrap();
            assert_eq!(ids.dims(), &[batch.rows(), batch.len()]);
            assert_eq!(labels.dims(), ids.dims());
        }
    }
}
