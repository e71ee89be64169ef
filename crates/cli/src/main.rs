//! `rupantor`: QLoRA fine-tuning and serving of Gemma models for Bangla-to-Python code
//! generation (BLP-2025 Task 2).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod bench_decode;
mod bench_sandbox;
mod bench_train;
mod eval;
mod generate;
mod model_arg;
mod perplexity;
mod quantize;
mod run_config;
mod safetensors_out;
mod train;

#[derive(Parser, Debug)]
#[command(
    name = "rupantor",
    version,
    about = "QLoRA fine-tuning and serving of Gemma for Bangla-to-Python code generation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Quantize a checkpoint's linear weights to NF4 (bitsandbytes layout), or reverse it.
    Quantize(quantize::QuantizeArgs),
    /// Benchmarks that print a ratio against a baseline measured in the same run.
    Bench(bench::BenchArgs),
    /// Run predictions against a split's asserts in the sandbox: pass@1 and error classes.
    Eval(eval::EvalArgs),
    /// Mean next-token NLL and perplexity of a text file under a model.
    Perplexity(perplexity::PerplexityArgs),
    /// Generate a program for every problem of a split (JSONL, or submission.json).
    Generate(Box<generate::GenerateArgs>),
    /// Train a LoRA adapter on the trial split (QLoRA: frozen NF4 base, paged 8-bit AdamW).
    Train(train::TrainArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let what = cli.command.doing();
    let result = match cli.command {
        Command::Quantize(args) => quantize::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Generate(args) => generate::run(*args),
        Command::Train(args) => train::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A GPU out of memory gets the line that says what to lower, above the chain
            // that says where it happened.
            if e.chain().any(rupantor_model::device::is_out_of_memory) {
                eprintln!(
                    "Error: {}",
                    rupantor_model::device::out_of_memory_hint(what)
                );
            }
            eprintln!("Error: {e:?}");
            ExitCode::FAILURE
        }
    }
}

impl Command {
    /// What the command does, for messages.
    fn doing(&self) -> &'static str {
        match self {
            Command::Quantize(_) => "quantizing",
            Command::Bench(_) => "benchmarking",
            Command::Eval(_) => "scoring",
            Command::Perplexity(_) => "computing perplexity",
            Command::Generate(_) => "generating",
            Command::Train(_) => "training",
        }
    }
}
