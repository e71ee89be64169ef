//! `rupantor bench quant --device cuda`: the NF4 kernels of `kernels/nf4.cu` against a
//! device-to-device copy on the same GPU in the same run.
//!
//! * Dequantization of a `rows x cols` weight to f32 and to bf16, each against a copy of the
//!   same output size ([`Nf4Cuda::measure_dequant_bandwidth`]): the ratio of output rates, 1.0
//!   = as fast as a copy.
//! * The fused NF4 x bf16 GEMV at each batch size, against the copy's DRAM traffic (bytes read
//!   plus written per second, from the f32 measurement, whose 2 x 205 MB do not fit in any L2):
//!   the GEMV's rate is the bytes it must read (the NF4 weight, its absmax codes and scales,
//!   and x) plus the y it writes, per second. The weight is uploaded in enough copies (at
//!   least 256 MiB together) that consecutive calls cycle through them and none is still in
//!   the L2 cache when it is read again, so the figure is DRAM bandwidth, not cache bandwidth.
//!
//! Every time is the fastest of several rounds of back-to-back launches between CUDA events.

use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use half::bf16;
use rupantor_model::random::{random_nf4, random_uniform, WEIGHT_STD};
use rupantor_quant::cuda::{BandwidthReport, Nf4Cuda, OutDtype};

use super::QuantBenchArgs;

/// Rounds per measurement (the fastest counts).
const ROUNDS: usize = 5;
/// The weight copies of the GEMV measurement add up to at least this (four times the largest
/// L2 cache of current GPUs, the H100/H200's 50-60 MB).
const L2_FREE_BYTES: usize = 256 << 20;

/// One batch size of the GEMV measurement.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GemvResult {
    pub batch: usize,
    /// Microseconds per call.
    pub us: f64,
    /// Bytes one call reads and writes (NF4 weight with its absmax, x, y).
    pub bytes: usize,
    /// `bytes` per second, in GB/s.
    pub gb_per_s: f64,
    /// Over the copy's DRAM traffic.
    pub ratio_vs_copy: f64,
}

impl GemvResult {
    fn new(batch: usize, us: f64, bytes: usize, copy_traffic_gbps: f64) -> Self {
        let gb_per_s = bytes as f64 / (us * 1e-6) / 1e9;
        GemvResult {
            batch,
            us,
            bytes,
            gb_per_s,
            ratio_vs_copy: gb_per_s / copy_traffic_gbps,
        }
    }
}

/// Milliseconds per call of `f(i)` for `i` in `0..iters`: the fastest of `rounds` rounds of
/// back-to-back calls between two events on `stream`, after one untimed round.
pub fn best_ms_per_call(
    stream: &Arc<CudaStream>,
    rounds: usize,
    iters: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    anyhow::ensure!(rounds > 0 && iters > 0, "rounds and iters must be positive");
    for i in 0..iters {
        f(i)?;
    }
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let start = stream
            .record_event(Some(CU_EVENT_DEFAULT))
            .context("recording an event")?;
        for i in 0..iters {
            f(i)?;
        }
        let end = stream
            .record_event(Some(CU_EVENT_DEFAULT))
            .context("recording an event")?;
        let ms = start.elapsed_ms(&end).context("reading an event")?;
        best = best.min(f64::from(ms) / iters as f64);
    }
    Ok(best)
}

fn dequant_json(r: &BandwidthReport) -> serde_json::Value {
    serde_json::json!({
        "dtype": r.dtype.name(),
        "dequant_ms": r.dequant_ms,
        "copy_ms": r.copy_ms,
        "dequant_gb_per_s": r.dequant_gbps(),
        "dequant_traffic_gb_per_s": r.dequant_traffic_gbps(),
        "copy_gb_per_s": r.copy_gbps(),
        "copy_traffic_gb_per_s": r.copy_traffic_gbps(),
        "ratio": r.ratio(),
    })
}

pub fn run(a: &QuantBenchArgs) -> Result<()> {
    let (rows, cols) = (a.rows, a.cols);
    anyhow::ensure!(rows > 0 && cols > 0, "need --rows and --cols > 0");
    let batches = &a.batch;
    anyhow::ensure!(
        !batches.is_empty() && !batches.contains(&0),
        "--batch needs sizes >= 1"
    );
    let nf4 = Nf4Cuda::new(0)?;
    let gpu = nf4.context().name().unwrap_or_else(|_| "?".into());
    let stream = nf4.stream().clone();
    let host = random_nf4(&[rows, cols], 1, WEIGHT_STD);
    let w = nf4.upload(&host)?;
    println!(
        "{gpu}: NF4 {rows} x {cols} ({} bytes with its absmax)",
        w.storage_bytes()
    );

    let mut dequant = Vec::new();
    for dtype in [OutDtype::F32, OutDtype::Bf16] {
        let r = nf4.measure_dequant_bandwidth(&w, dtype, ROUNDS, a.iters)?;
        println!("{r}");
        dequant.push(r);
    }
    let copy_traffic = dequant[0].copy_traffic_gbps();

    // Weight copies for the GEMV, cycled through (see the module docs).
    let copies = L2_FREE_BYTES.div_ceil(w.storage_bytes()).max(1);
    let mut weights = vec![w];
    for k in 1..copies {
        weights.push(nf4.upload(&random_nf4(&[rows, cols], 1 + k as u64, WEIGHT_STD))?);
    }
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let x_host: Vec<bf16> = random_uniform(max_batch * cols, 7, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let x = stream.clone_htod(&x_host).context("uploading x")?;
    let mut y = stream
        .alloc_zeros::<bf16>(max_batch * rows)
        .context("allocating y")?;
    let mut gemv = Vec::new();
    for &b in batches {
        let xs = x.slice(0..b * cols);
        let ms = best_ms_per_call(&stream, ROUNDS, a.iters.max(1) * copies, |i| {
            let mut ys = y.slice_mut(0..b * rows);
            nf4.gemv_bf16_into(&weights[i % copies], &xs, b, &mut ys)?;
            Ok(())
        })?;
        let bytes = weights[0].storage_bytes() + 2 * b * (rows + cols);
        let r = GemvResult::new(b, ms * 1e3, bytes, copy_traffic);
        println!(
            "fused NF4 GEMV {rows} x {cols}, batch {b}: {:.1} us, {:.0} GB/s = {:.2} of the d2d \
             copy's {:.0} GB/s ({copies} weight copies cycled)",
            r.us, r.gb_per_s, r.ratio_vs_copy, copy_traffic
        );
        gemv.push(r);
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "device": "cuda",
                "gpu": gpu,
                "rows": rows,
                "cols": cols,
                "nf4_bytes": weights[0].storage_bytes(),
                "dequant": dequant.iter().map(dequant_json).collect::<Vec<_>>(),
                "copy_traffic_gb_per_s": copy_traffic,
                "gemv": gemv,
            })
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemv_rates_are_bytes_over_time_against_the_copy() {
        // 26.5 MB in 50 us is 530 GB/s; against a 4000 GB/s copy, 0.1325.
        let r = GemvResult::new(1, 50.0, 26_500_000, 4000.0);
        assert!((r.gb_per_s - 530.0).abs() < 1e-9);
        assert!((r.ratio_vs_copy - 0.1325).abs() < 1e-12);
    }
}
