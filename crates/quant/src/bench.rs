//! The NF4 dequant-versus-copy measurement shared by `benches/nf4_dequant.rs` and
//! `rupantor bench quant`: both sides write the same number of output bytes in the same run,
//! so their ratio says how close dequantization gets to memory bandwidth.

use crate::nf4::{dequantize_nf4, Nf4Tensor};
use std::hint::black_box;
use std::time::Instant;

/// Median throughputs in output bytes per second.
#[derive(Debug, Clone, Copy)]
pub struct DequantVsCopy {
    pub rows: usize,
    pub cols: usize,
    pub threads: usize,
    pub dequant_bytes_per_s: f64,
    pub copy_bytes_per_s: f64,
}

impl DequantVsCopy {
    pub fn ratio(&self) -> f64 {
        self.dequant_bytes_per_s / self.copy_bytes_per_s
    }
}

impl std::fmt::Display for DequantVsCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "nf4 dequant {}x{} -> f32: {:.2} GB/s | copy_from_slice: {:.2} GB/s | ratio {:.2} ({} threads)",
            self.rows,
            self.cols,
            self.dequant_bytes_per_s / 1e9,
            self.copy_bytes_per_s / 1e9,
            self.ratio(),
            self.threads
        )
    }
}

/// Deterministic weights in [-0.025, 0.025); their values do not affect dequant speed.
pub fn synthetic_weights(n: usize) -> Vec<f32> {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05
        })
        .collect()
}

/// Median seconds of `iters` calls after one warm-up call.
pub fn median_secs(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Time NF4 -> f32 dequantization of a `rows x cols` weight against `copy_from_slice` of an
/// f32 buffer of the same size, alternating so both see the same machine state.
pub fn dequant_vs_copy(rows: usize, cols: usize, iters: usize) -> DequantVsCopy {
    let w = synthetic_weights(rows * cols);
    let t = Nf4Tensor::quantize_f32(&w, &[rows, cols]);
    let absmax = t.absmax.dequantize();
    let src = w;
    let mut out = vec![0f32; src.len()];
    let bytes = (out.len() * 4) as f64;
    let mut deq = Vec::new();
    let mut copy = Vec::new();
    for _ in 0..3 {
        copy.push(median_secs(iters, || out.copy_from_slice(black_box(&src))));
        deq.push(median_secs(iters, || {
            dequantize_nf4(black_box(&t.packed), black_box(&absmax), &mut out)
        }));
    }
    let best = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    DequantVsCopy {
        rows,
        cols,
        threads: rayon::current_num_threads(),
        dequant_bytes_per_s: bytes / best(&deq),
        copy_bytes_per_s: bytes / best(&copy),
    }
}
