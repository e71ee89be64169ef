//! `rupantor bench`: measurements that print a ratio against a baseline run in the same
//! process, never a bare number.

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::model_arg::DeviceKind;

#[cfg(feature = "cuda")]
mod quant_cuda;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchCommand,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// NF4 dequantization throughput versus a copy of the same output size (with
    /// `--device cuda`: f32 and bf16 dequant and the fused GEMV against a device copy).
    Quant(QuantBenchArgs),
    /// Sandboxed scoring throughput versus an in-process `exec` scorer on the same programs.
    Sandbox(crate::bench_sandbox::BenchSandboxArgs),
    /// Prefill / decode tokens/s and peak memory at batch 1 and 8 (optionally vs HF
    /// transformers).
    Decode(crate::bench_decode::BenchDecodeArgs),
    /// QLoRA train-step tokens/s and peak memory (forward, chunked loss, backward, 8-bit
    /// AdamW).
    TrainStep(crate::bench_train::TrainStepBenchArgs),
}

#[derive(Args, Debug)]
pub struct QuantBenchArgs {
    /// Weight rows (default: a Gemma-2-9B MLP projection, 3584 x 14336).
    #[arg(long, default_value_t = 3584)]
    pub rows: usize,
    #[arg(long, default_value_t = 14336)]
    pub cols: usize,
    /// Timed calls per measurement (CPU: the median is kept; cuda: calls per timed round,
    /// the fastest round is kept).
    #[arg(long, default_value_t = 15)]
    pub iters: usize,
    /// Worker threads (default: all cores; CPU only).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where the kernels run [default: cpu]; cuda needs a build with `--features cuda`.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// Batch sizes of the fused GEMV, comma-separated (cuda only).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch: Vec<usize>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchCommand::Sandbox(a) => crate::bench_sandbox::run(a),
        BenchCommand::Decode(a) => crate::bench_decode::run(a),
        BenchCommand::TrainStep(a) => crate::bench_train::run(a),
        BenchCommand::Quant(a) if a.device == DeviceKind::Cuda => quant_cuda(&a),
        BenchCommand::Quant(a) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(a.threads.unwrap_or(0))
                .build()?;
            let r =
                pool.install(|| rupantor_quant::bench::dequant_vs_copy(a.rows, a.cols, a.iters));
            println!("{r}");
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "rows": r.rows, "cols": r.cols, "threads": r.threads,
                        "dequant_gb_per_s": r.dequant_bytes_per_s / 1e9,
                        "copy_gb_per_s": r.copy_bytes_per_s / 1e9,
                        "ratio": r.ratio(),
                    })
                );
            }
            Ok(())
        }
    }
}

#[cfg(feature = "cuda")]
fn quant_cuda(a: &QuantBenchArgs) -> Result<()> {
    quant_cuda::run(a)
}

#[cfg(not(feature = "cuda"))]
fn quant_cuda(_: &QuantBenchArgs) -> Result<()> {
    Err(rupantor_model::device::DeviceError::NotBuilt.into())
}
