//! With the `cuda` feature: compiles every `kernels/*.cu` to PTX with nvcc and writes
//! `$OUT_DIR/kernels.rs`, which embeds each module's PTX (see `src/cuda.rs`).
//!
//! PTX for compute capability 8.0 (`compute_80`) loads on every GPU from Ampere on: the driver
//! JIT-compiles it once per process for the GPU at hand. Compiling here rather than with NVRTC
//! at run time keeps libnvrtc and the CUDA headers off the GPU host, and a kernel that does not
//! compile fails the build, not the first run.
//!
//! `-fmad=false` stops nvcc contracting `a * b + c` into an FMA and `-ftz=false` keeps f32
//! subnormals, so the codec and optimizer kernels are bit-identical to their CPU twins (the
//! sources also spell every rounding out with `__fmul_rn` / `__fadd_rn` / `__fmaf_rn`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// nvcc options for every kernel module.
const NVCC_FLAGS: &[&str] = &[
    "--ptx",
    "-arch=compute_80",
    "-fmad=false",
    "-ftz=false",
    "-prec-div=true",
    "-prec-sqrt=true",
    "-std=c++17",
    "-O3",
];

fn main() {
    let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
    println!("cargo::rerun-if-changed={}", kernels.display());
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernels)
        .unwrap_or_else(|e| panic!("reading {}: {e}", kernels.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    let nvcc = nvcc();
    let mut table = String::from(
        "/// `(module, PTX)` for every `kernels/*.cu`, compiled by build.rs.\n\
         pub const MODULES: &[(&str, &str)] = &[\n",
    );
    for src in &sources {
        let stem = src
            .file_stem()
            .unwrap()
            .to_str()
            .expect("UTF-8 kernel name");
        let ptx = out.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .args(NVCC_FLAGS)
            .arg(src)
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
        if !status.success() {
            panic!("nvcc failed on {} ({status})", src.display());
        }
        table.push_str(&format!(
            "    ({stem:?}, include_str!({:?})),\n",
            ptx.display().to_string()
        ));
    }
    table.push_str("];\n");
    std::fs::write(out.join("kernels.rs"), table).expect("writing kernels.rs");
}

/// `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on the PATH.
fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return p.into();
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let p = Path::new(&home).join("bin/nvcc");
        if p.is_file() {
            return p;
        }
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("nvcc"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "the `cuda` feature compiles kernels/*.cu with nvcc, and none was found ($NVCC, \
             $CUDA_HOME/bin, PATH): run `source scripts/cuda-env.sh` first (it installs the \
             CUDA 13.0 compiler from PyPI)"
        )
    })
}
