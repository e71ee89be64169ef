//! Gradient clipping by global L2 norm, as `torch.nn.utils.clip_grad_norm_(params, max_norm)`.

use rayon::prelude::*;

/// Elements per partial sum. Fixed, so the norm does not depend on the thread count.
const CHUNK: usize = 8192;

/// The L2 norm of all gradients taken as one vector.
///
/// Squares are summed in f64 over fixed chunks in a fixed order, then rounded to f32. torch
/// sums in f32 with a vectorised, blocked order of its own, so the two can differ in the last
/// bit or two of the f32 result; ours is deterministic and at least as accurate.
pub fn global_grad_norm(grads: &[&[f32]]) -> f32 {
    let mut total = 0.0f64;
    for g in grads {
        let partials: Vec<f64> = g
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
            .collect();
        total += partials.iter().sum::<f64>();
    }
    total.sqrt() as f32
}

/// torch's clip coefficient for a finite total norm: `max_norm / (total + 1e-6)`, formed in f32
/// as torch forms it (`max_norm / t` on a tensor is `t.reciprocal() * max_norm`), capped at 1.
pub fn clip_coefficient(total: f32, max_norm: f32) -> f32 {
    let coef = (1.0 / (total + 1e-6f32)) * max_norm;
    if coef > 1.0 {
        1.0
    } else {
        coef
    }
}

/// Scale every gradient by `min(max_norm / (total_norm + 1e-6), 1)` and return the total norm
/// before clipping.
///
/// The coefficient is [`clip_coefficient`]'s. A non-finite norm leaves the gradients untouched (torch would
/// multiply them by NaN) and is returned so the caller can stop the run on it.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> f32 {
    let views: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
    let total = global_grad_norm(&views);
    if !total.is_finite() {
        return total;
    }
    let coef = clip_coefficient(total, max_norm);
    for g in grads.iter_mut() {
        g.par_iter_mut().for_each(|x| *x *= coef);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_to_max_norm_and_leaves_small_gradients() {
        let mut a = vec![3.0f32, 0.0];
        let mut b = vec![4.0f32];
        let total = clip_grad_norm(&mut [&mut a, &mut b], 1.0);
        assert_eq!(total, 5.0);
        let after = global_grad_norm(&[&a, &b]);
        assert!((after - 1.0).abs() < 1e-6, "{after}");

        let mut c = vec![0.3f32, 0.4];
        let total = clip_grad_norm(&mut [&mut c], 1.0);
        assert!((total - 0.5).abs() < 1e-7);
        assert_eq!(c, vec![0.3, 0.4], "coefficient clamps to 1");
    }

    #[test]
    fn non_finite_norm_is_reported_not_applied() {
        let mut a = vec![1.0f32, f32::NAN];
        let total = clip_grad_norm(&mut [&mut a], 1.0);
        assert!(total.is_nan());
        assert_eq!(a[0], 1.0);
    }
}
