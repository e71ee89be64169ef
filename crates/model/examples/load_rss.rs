//! Peak host memory of loading a model: `cargo run --release -p rupantor-model --example
//! load_rss -- [PATH] [--dense]`.
//!
//! PATH is a .gguf file or an HF model directory (default: the embedded Gemma-3 270M GGUF that
//! scripts/get-model.sh assembles). The model is loaded through the QLoRA builder (every
//! projection quantized to NF4 as it streams in), or with `--dense` as f32; the process then
//! reports load time and `VmHWM` (peak resident set) / `VmRSS` from /proc/self/status (Linux).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use rupantor_model::{load_model, DenseBuilder, LinearBuilder, QLoraBuilder};

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn default_model() -> PathBuf {
    let cache = std::env::var_os("RUPANTOR_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("rupantor")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/rupantor")))
        .unwrap_or_else(|| PathBuf::from("."));
    cache.join("models/gemma-3-270m-q4_k_m.gguf")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut dense = false;
    let mut path = None;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--dense" => dense = true,
            "-h" | "--help" => {
                println!("usage: load_rss [PATH] [--dense]");
                return Ok(());
            }
            _ => path = Some(PathBuf::from(arg)),
        }
    }
    let path = path.unwrap_or_else(default_model);
    let file_bytes = std::fs::metadata(&path)?.len();
    let dev = Device::Cpu;
    let before = status_kib("VmRSS:");

    let t = Instant::now();
    let mut qlora = QLoraBuilder::new(&dev);
    let mut dense_builder = DenseBuilder::new(&dev);
    let builder: &mut dyn LinearBuilder = if dense {
        &mut dense_builder
    } else {
        &mut qlora
    };
    let model = load_model(&path, &dev, builder)?;
    let elapsed = t.elapsed();

    let cfg = model.config();
    println!("model: {}", path.display());
    println!(
        "  {:?}, {} layers, hidden {}, vocab {}; file {:.1} MiB",
        cfg.arch,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.vocab_size,
        file_bytes as f64 / (1 << 20) as f64
    );
    println!(
        "builder: {}",
        if dense {
            "dense f32"
        } else {
            "QLoRA (NF4 + LoRA r32)"
        }
    );
    println!("load time: {elapsed:.2?}");
    println!("VmRSS before load: {}", mib(before));
    println!("VmRSS after load:  {}", mib(status_kib("VmRSS:")));
    println!("VmHWM (peak RSS):  {}", mib(status_kib("VmHWM:")));
    drop(model);
    Ok(())
}
