//! The schedule against `transformers.get_cosine_schedule_with_warmup` and clipping against
//! `torch.nn.utils.clip_grad_norm_` (`fixtures/optim/schedule_clip.safetensors`, made by
//! `scripts/fixtures/adamw8bit.py`).

mod common;

use common::{f32s, f64s, fixture};
use rupantor_train::{clip_grad_norm, global_grad_norm, CosineWithWarmup};
use safetensors::SafeTensors;

/// Bit for bit: both sides compute in f64 with the same operations and the same libm `cos`.
#[test]
fn cosine_schedule_equals_transformers() {
    let data = fixture("schedule_clip.safetensors");
    let st = SafeTensors::deserialize(&data).unwrap();
    // (name, base lr, warmup, total) as in the fixture script's SCHEDULES.
    let cases = [
        ("paper", 5e-5, 10, 100),
        ("no_warmup", 1e-3, 0, 50),
        ("all_warmup", 2e-4, 3, 3),
        ("odd", 3e-4, 7, 31),
    ];
    for (name, base, warmup, total) in cases {
        let want = f64s(&st, &format!("sched.{name}"));
        let s = CosineWithWarmup::new(base, warmup, total);
        for (step, &w) in want.iter().enumerate() {
            let got = s.lr_at(step as u64);
            assert_eq!(
                got.to_bits(),
                w.to_bits(),
                "{name} step {step}: {got:e} vs {w:e}"
            );
        }
    }
}

/// torch sums the squares in f32 in its own vectorised order; we sum in f64 (see
/// `global_grad_norm`), so the norms may differ in the last f32 bits: they are checked to 1e-6
/// relative, and the clipped gradients likewise. On this fixture the norms come out identical,
/// and then the clipped gradients must be identical bits too.
#[test]
fn clipping_equals_torch() {
    let data = fixture("schedule_clip.safetensors");
    let st = SafeTensors::deserialize(&data).unwrap();
    for case in ["clipped", "unclipped"] {
        let mut grads: Vec<Vec<f32>> = (0..4)
            .map(|i| f32s(&st, &format!("clip.{case}.grad.{i}")))
            .collect();
        let want_norm = f32s(&st, &format!("clip.{case}.total_norm"))[0];
        let views: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
        let norm = global_grad_norm(&views);
        assert!(
            ((norm - want_norm) / want_norm).abs() <= 1e-6,
            "{case}: {norm} vs {want_norm}"
        );

        let mut refs: Vec<&mut [f32]> = grads.iter_mut().map(Vec::as_mut_slice).collect();
        let returned = clip_grad_norm(&mut refs, 1.0);
        assert_eq!(returned, norm);
        for (i, g) in grads.iter().enumerate() {
            let want = f32s(&st, &format!("clip.{case}.clipped.{i}"));
            for (j, (a, b)) in g.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1e-30),
                    "{case} grad {i}[{j}]: {a} vs {b}"
                );
                // Given the same norm (as here), the coefficient is formed as torch forms it,
                // so the clipped gradients are the same bits.
                if norm == want_norm {
                    assert_eq!(a.to_bits(), b.to_bits(), "{case} grad {i}[{j}]");
                }
            }
        }
        if case == "unclipped" {
            assert!(want_norm < 1.0);
            // The coefficient clamps to exactly 1: gradients are untouched.
            for (i, g) in grads.iter().enumerate() {
                assert_eq!(g, &f32s(&st, &format!("clip.{case}.grad.{i}")), "grad {i}");
            }
        } else {
            assert!(want_norm > 1.0);
            let views: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
            assert!((global_grad_norm(&views) - 1.0).abs() < 1e-5);
        }
    }
}
