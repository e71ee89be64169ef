//! NF4 -> f32 dequantization throughput against a plain copy of the same output size, in the
//! same run. A dequant kernel that reaches memcpy speed is limited by memory, not arithmetic.
//!
//!     cargo bench -p rupantor-quant --bench nf4_dequant
//!
//! Criterion reports both throughputs (output bytes/s); the last line prints the
//! dequant/copy ratio. RAYON_NUM_THREADS sets the thread count (default: all cores).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rupantor_quant::bench::{dequant_vs_copy, synthetic_weights};
use rupantor_quant::nf4::{dequantize_nf4, Nf4Tensor};
use std::hint::black_box;
use std::time::Duration;

/// A Gemma-2-9B MLP projection (3584 x 14336): 205 MB of f32 output, far beyond any cache,
/// so both sides stream from DRAM.
const ROWS: usize = 3584;
const COLS: usize = 14336;

fn bench(c: &mut Criterion) {
    let w = synthetic_weights(ROWS * COLS);
    let t = Nf4Tensor::quantize_f32(&w, &[ROWS, COLS]);
    let absmax = t.absmax.dequantize();
    let mut out = vec![0f32; w.len()];

    let mut group = c.benchmark_group(format!("nf4_{ROWS}x{COLS}"));
    group.throughput(Throughput::Bytes((out.len() * 4) as u64));
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    group.bench_function("copy_from_slice", |b| {
        b.iter(|| out.copy_from_slice(black_box(&w)))
    });
    group.bench_function("nf4_dequant_f32", |b| {
        b.iter(|| dequantize_nf4(black_box(&t.packed), black_box(&absmax), &mut out))
    });
    group.finish();
    println!("{}", dequant_vs_copy(ROWS, COLS, 15));
}

criterion_group!(benches, bench);
criterion_main!(benches);
