//! `rupantor bench`: measurements that print a ratio against a baseline run in the same
//! process, never a bare number.

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchCommand,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// NF4 -> f32 dequantization throughput versus a copy of the same output size.
    Quant(QuantBenchArgs),
    /// Sandboxed scoring throughput versus an in-process `exec` scorer on the same programs.
    Sandbox(crate::bench_sandbox::BenchSandboxArgs),
    /// Prefill / decode tokens/s and peak RSS at batch 1 and 8 (optionally vs HF transformers).
    Decode(crate::bench_decode::BenchDecodeArgs),
    /// QLoRA train-step tokens/s and peak RSS (forward, chunked loss, backward, 8-bit AdamW).
    TrainStep(crate::bench_train::TrainStepBenchArgs),
}

#[derive(Args, Debug)]
pub struct QuantBenchArgs {
    /// Weight rows (default: a Gemma-2-9B MLP projection, 3584 x 14336).
    #[arg(long, default_value_t = 3584)]
    pub rows: usize,
    #[arg(long, default_value_t = 14336)]
    pub cols: usize,
    /// Timed calls per measurement (the median is kept).
    #[arg(long, default_value_t = 15)]
    pub iters: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchCommand::Sandbox(a) => crate::bench_sandbox::run(a),
        BenchCommand::Decode(a) => crate::bench_decode::run(a),
        BenchCommand::TrainStep(a) => crate::bench_train::run(a),
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
