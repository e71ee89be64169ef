//! CPU-only: compiles every `kernels/*.cu` with NVRTC (no GPU needed) and fails on any compile
//! error. Skips, saying so, only when libnvrtc cannot be found — unless `RUPANTOR_REQUIRE_NVRTC=1`
//! (set by scripts/ci-nvrtc.sh), which turns a missing libnvrtc into a failure.
#![cfg(feature = "cuda")]

use rupantor_quant::cuda::{self, CompiledKernels, CudaError, NF4_ENTRY_POINTS};
use rupantor_quant::NF4_CODE;
use std::path::{Path, PathBuf};

/// Virtual (PTX) and real (CUBIN, which also runs ptxas) targets: Ampere and Hopper.
const ARCHS: [&str; 4] = ["compute_80", "compute_90", "sm_80", "sm_90"];

/// `kernels/` of the workspace, or `RUPANTOR_KERNELS_DIR` (to check other sources the same way).
fn kernels_dir() -> PathBuf {
    std::env::var_os("RUPANTOR_KERNELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels"))
}

fn cu_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(kernels_dir())
        .expect("kernels/ directory")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    files.sort();
    files
}

/// True when NVRTC is usable; prints why not and returns false when it is absent (and absence
/// is allowed).
fn nvrtc_or_skip(test: &str) -> bool {
    match cuda::nvrtc_library() {
        Ok(lib) => {
            eprintln!(
                "{test}: NVRTC {}.{} ({}), headers in {}",
                lib.version.0,
                lib.version.1,
                lib.preloaded
                    .as_ref()
                    .map_or("found on the loader path".to_string(), |p| p
                        .display()
                        .to_string()),
                cuda::cuda_include_dir()
                    .map_or_else(|e| e.to_string(), |d| d.display().to_string()),
            );
            true
        }
        Err(e @ CudaError::NvrtcNotFound { .. }) => {
            if std::env::var("RUPANTOR_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
                panic!("RUPANTOR_REQUIRE_NVRTC=1 but {e}");
            }
            eprintln!("SKIPPED {test}: {e}");
            false
        }
        Err(e) => panic!("NVRTC is present but unusable: {e}"),
    }
}

/// Names declared `extern "C" __global__ void [__launch_bounds__(..)] NAME(` in CUDA source.
fn declared_kernels(src: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = src;
    while let Some(at) = rest.find("extern \"C\" __global__") {
        rest = &rest[at + "extern \"C\" __global__".len()..];
        let mut s = rest
            .trim_start()
            .strip_prefix("void")
            .expect("kernels return void")
            .trim_start();
        if let Some(after) = s.strip_prefix("__launch_bounds__") {
            let close = after
                .find(')')
                .expect("closing parenthesis of __launch_bounds__");
            s = after[close + 1..].trim_start();
        }
        let name: String = s
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            !name.is_empty(),
            "unnamed kernel near {:?}",
            &s[..s.len().min(40)]
        );
        names.push(name);
    }
    names
}

/// The body of `.entry name` in PTX text, up to the next entry.
fn entry_body<'a>(ptx: &'a str, name: &str) -> &'a str {
    let start = ptx
        .find(&format!(".entry {name}("))
        .unwrap_or_else(|| panic!("no .entry {name}"));
    let body = &ptx[start..];
    let end = body[1..].find(".entry ").map_or(body.len(), |e| e + 1);
    &body[..end]
}

/// The bytes of a `.b8 name[64] = {...}` PTX initializer.
fn ptx_const_bytes(ptx: &str, name: &str) -> Vec<u8> {
    let decl = format!("{name}[64] = {{");
    let start = ptx
        .find(&decl)
        .unwrap_or_else(|| panic!("no initializer for {name}"))
        + decl.len();
    let end = start + ptx[start..].find('}').expect("end of initializer");
    ptx[start..end]
        .split(',')
        .map(|b| b.trim().parse::<u8>().expect("PTX byte"))
        .collect()
}

fn check_nf4(c: &CompiledKernels) {
    let entries = c.entry_points();
    for name in NF4_ENTRY_POINTS {
        assert!(
            entries.iter().any(|e| e == name),
            "{}: {name} missing from PTX entries {entries:?}",
            c.arch
        );
    }
    // The dequantization kernels must be FMA-free (--fmad=false + __fmul_rn/__fadd_rn), which is
    // what makes them bit-exact with the CPU; the GEMV uses explicit FMAs on purpose.
    for name in [
        "kDequantizeNF4_f32",
        "kDequantizeNF4_bf16",
        "kDequantizeNF4_f16",
    ] {
        let body = entry_body(&c.ptx, name);
        assert!(!body.contains("fma."), "{}: {name} contains an FMA", c.arch);
        assert!(
            body.contains("mul.rn.f32"),
            "{}: {name} lacks mul.rn.f32",
            c.arch
        );
        assert!(
            body.contains("add.rn.f32"),
            "{}: {name} lacks add.rn.f32 (absmax offset)",
            c.arch
        );
    }
    assert!(entry_body(&c.ptx, "kDequantizeNF4_bf16").contains("cvt.rn.bf16.f32"));
    assert!(entry_body(&c.ptx, "kDequantizeNF4_f16").contains("cvt.rn.f16.f32"));
    // The compiled code table is bit-identical to the CPU's.
    let want: Vec<u8> = NF4_CODE.iter().flat_map(|c| c.to_le_bytes()).collect();
    assert_eq!(
        ptx_const_bytes(&c.ptx, "kNf4Code"),
        want,
        "{}: kNf4Code differs from NF4_CODE",
        c.arch
    );
}

#[test]
fn every_cu_file_compiles_for_sm80_and_sm90() {
    if !nvrtc_or_skip("every_cu_file_compiles_for_sm80_and_sm90") {
        return;
    }
    let files = cu_files();
    assert!(
        files.iter().any(|f| f.ends_with("nf4.cu")),
        "kernels/nf4.cu not found among {files:?}"
    );
    let mut failures = Vec::new();
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let src =
            std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let declared = declared_kernels(&src);
        assert!(
            !declared.is_empty(),
            "{name} declares no extern \"C\" __global__ kernels"
        );
        for arch in ARCHS {
            match cuda::compile_source(&name, &src, arch) {
                Ok(c) => {
                    let entries = c.entry_points();
                    for k in &declared {
                        assert!(
                            entries.contains(k),
                            "{name} ({arch}): declared kernel {k} missing from PTX {entries:?}"
                        );
                    }
                    if arch.starts_with("sm_") {
                        let cubin = c.cubin.as_ref().expect("CUBIN for a real architecture");
                        assert!(
                            cubin.starts_with(b"\x7fELF"),
                            "{name} ({arch}): CUBIN is not an ELF image"
                        );
                    }
                    if name == "nf4.cu" {
                        check_nf4(&c);
                    }
                    eprintln!(
                        "compiled {name} for {arch}: {} kernels {:?}, PTX {} bytes{}{}",
                        entries.len(),
                        entries,
                        c.ptx.len(),
                        c.cubin
                            .as_ref()
                            .map_or(String::new(), |b| format!(", CUBIN {} bytes", b.len())),
                        if c.log.trim().is_empty() {
                            String::new()
                        } else {
                            format!("\nNVRTC log:\n{}", c.log)
                        },
                    );
                }
                Err(e) => failures.push(format!("{name} ({arch}): {e}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "NVRTC compile errors:\n{}",
        failures.join("\n\n")
    );
}

#[test]
fn compile_errors_carry_the_nvrtc_log() {
    if !nvrtc_or_skip("compile_errors_carry_the_nvrtc_log") {
        return;
    }
    let bad = "extern \"C\" __global__ void broken(float* out) { out[0] = undeclared_name; }";
    match cuda::compile_source("broken.cu", bad, "compute_80") {
        Err(CudaError::Compile {
            log, arch, options, ..
        }) => {
            assert!(
                log.contains("undeclared_name"),
                "log does not name the error: {log}"
            );
            assert_eq!(arch, "compute_80");
            assert!(options.iter().any(|o| o == "--fmad=false"));
        }
        Err(e) => panic!("expected a compile error, got {e}"),
        Ok(_) => panic!("broken source compiled"),
    }
}

#[test]
fn compile_kernels_gives_a_loadable_ptx() {
    if !nvrtc_or_skip("compile_kernels_gives_a_loadable_ptx") {
        return;
    }
    let ptx = cuda::compile_kernels(cuda::NF4_SOURCE)
        .expect("nf4.cu compiles")
        .to_src();
    assert!(ptx.contains(".target sm_80"), "PTX targets sm_80");
    for name in NF4_ENTRY_POINTS {
        assert!(
            ptx.contains(&format!(".visible .entry {name}(")),
            "{name} is not a visible entry"
        );
    }
}
