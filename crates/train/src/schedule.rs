//! Learning-rate schedule: cosine decay after a linear warmup, with the semantics of HF
//! transformers' `get_cosine_schedule_with_warmup` (default `num_cycles = 0.5`) driving
//! `torch.optim.lr_scheduler.LambdaLR`.

use serde::{Deserialize, Serialize};

/// `lr(step) = base_lr * factor(step)` for the optimizer step `step` (0-based: the first
/// update uses step 0, as LambdaLR's `last_epoch` does).
///
/// * warmup (`step < warmup_steps`): `step / max(1, warmup_steps)`;
/// * then `max(0, 0.5 * (1 + cos(pi * progress)))` with
///   `progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)`.
///
/// Like HF, steps past `total_steps` are not clamped: the cosine rises again.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CosineWithWarmup {
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl CosineWithWarmup {
    pub fn new(base_lr: f64, warmup_steps: u64, total_steps: u64) -> Self {
        CosineWithWarmup {
            base_lr,
            warmup_steps,
            total_steps,
        }
    }

    /// The multiplier of `base_lr` at `step`, computed in f64 in HF's order of operations.
    pub fn factor(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps.max(1) as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = (step - self.warmup_steps) as f64 / span as f64;
        // HF writes `math.pi * num_cycles * 2.0 * progress`; with num_cycles = 0.5 the first
        // two products are exact, so this is `pi * progress` bit for bit.
        let factor = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        if factor > 0.0 {
            factor
        } else {
            0.0
        }
    }

    /// The learning rate of optimizer step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_zero() {
        let s = CosineWithWarmup::new(1e-3, 10, 110);
        assert_eq!(s.lr_at(0), 0.0);
        assert_eq!(s.lr_at(5), 1e-3 * 0.5);
        assert_eq!(s.lr_at(10), 1e-3);
        assert!((s.lr_at(60) - 0.5e-3).abs() < 1e-15);
        assert!(s.lr_at(110) < 1e-15);
        // Monotone decay after warmup.
        for step in 10..110 {
            assert!(s.lr_at(step + 1) <= s.lr_at(step));
        }
    }

    #[test]
    fn degenerate_spans_do_not_divide_by_zero() {
        let s = CosineWithWarmup::new(2e-4, 3, 3);
        assert_eq!(s.lr_at(3), 2e-4);
        let s = CosineWithWarmup::new(2e-4, 0, 0);
        assert_eq!(s.lr_at(0), 2e-4);
    }
}
