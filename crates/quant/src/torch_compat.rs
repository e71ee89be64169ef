//! Bit-exact replicas of the few PyTorch CPU numerics that bitsandbytes' outputs depend on.
//!
//! bitsandbytes computes its dynamic 8-bit map with `torch.linspace` and the double-quant
//! offset with `Tensor.mean()`. Both round differently from the textbook formulas (FMA
//! contraction, cascade summation), and a one-ulp difference in the offset can flip an 8-bit
//! absmax code, so we follow PyTorch's x86-64 (AVX2) kernels exactly.

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU.
///
/// PyTorch's serial kernel fills the first half as `start + step * i` and the second half as
/// `end - step * (steps - i - 1)`; GCC contracts both into fused multiply-adds.
pub fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    match steps {
        0 => return Vec::new(),
        1 => return vec![start],
        _ => {}
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// Lane count of PyTorch's `Vectorized<float>` on AVX2, the x86-64 baseline wheels dispatch to.
const TORCH_VEC_LANES: usize = 8;
/// PyTorch's `row_sum` interleaves this many independent accumulators.
const ILP: usize = 4;
/// Levels of PyTorch's cascade accumulator (`multi_row_sum`).
const LEVELS: usize = 4;

fn ceil_log2(n: usize) -> usize {
    if n <= 1 {
        0
    } else {
        (usize::BITS - (n - 1).leading_zeros()) as usize
    }
}

/// PyTorch's `multi_row_sum`: `size` rows of `ILP` accumulators, each accumulator `W` lanes wide,
/// summed through a 4-level cascade so the rounding error grows like a pairwise sum.
fn multi_row_sum<const W: usize>(
    row: impl Fn(usize, usize) -> [f32; W],
    size: usize,
) -> [[f32; W]; ILP] {
    let level_power = 4.max(ceil_log2(size) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; W]; ILP]; LEVELS];
    let add = |a: &mut [f32; W], b: &[f32; W]| a.iter_mut().zip(b).for_each(|(x, y)| *x += *y);
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add(a, &row(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (hi, lo) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                add(hi, lo);
                *lo = [0.0; W];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add(a, &row(i, k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        let (first, rest) = acc.split_at_mut(1);
        for (a, b) in first[0].iter_mut().zip(rest[j - 1].iter()) {
            add(a, b);
        }
    }
    acc[0]
}

/// PyTorch's `row_sum`: view the row as `(-1, ILP)`, cascade-sum the columns, then fold the
/// leftovers and the ILP partials into the first accumulator.
fn row_sum<const W: usize>(load: impl Fn(usize) -> [f32; W], size: usize) -> [f32; W] {
    let rows = size / ILP;
    let mut partial = multi_row_sum(|i, k| load(i * ILP + k), rows);
    for i in rows * ILP..size {
        let v = load(i);
        partial[0].iter_mut().zip(v).for_each(|(a, b)| *a += b);
    }
    let (first, rest) = partial.split_at_mut(1);
    for p in rest.iter() {
        first[0].iter_mut().zip(p).for_each(|(a, b)| *a += *b);
    }
    first[0]
}

/// `torch.sum(x)` for a contiguous float32 tensor on one CPU thread.
///
/// Inputs of more than 32768 elements are split across threads by PyTorch, which makes its
/// result depend on the thread count; for those we still follow the one-thread order.
pub fn sum_f32(x: &[f32]) -> f32 {
    const W: usize = TORCH_VEC_LANES;
    if x.len() >= W {
        let vectors = x.len() / W;
        let lanes = row_sum::<W>(|i| x[i * W..(i + 1) * W].try_into().unwrap(), vectors);
        let mut total = 0f32;
        for v in &x[vectors * W..] {
            total += v;
        }
        for l in lanes {
            total += l;
        }
        total
    } else {
        row_sum::<1>(|i| [x[i]], x.len())[0]
    }
}

/// `torch.mean(x)` for a contiguous float32 tensor: the sum divided by the count, in f32.
pub fn mean_f32(x: &[f32]) -> f32 {
    sum_f32(x) / x.len() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_endpoints_and_monotone() {
        let v = linspace_f32(0.1, 1.0, 65);
        assert_eq!(v[0], 0.1);
        assert_eq!(v[64], 1.0);
        assert!(v.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(linspace_f32(0.1, 1.0, 2), vec![0.1, 1.0]);
    }

    #[test]
    fn sum_is_close_to_exact_sum() {
        for n in [1usize, 7, 8, 9, 63, 64, 65, 300, 1000, 4097] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 + 0.5)
                .collect();
            let exact: f64 = x.iter().map(|&v| v as f64).sum();
            let ours = sum_f32(&x) as f64;
            assert!(
                (ours - exact).abs() <= exact * 1e-6,
                "n={n}: {ours} vs {exact}"
            );
        }
        assert_eq!(sum_f32(&[]), 0.0);
    }
}
