//! CPU-only checks of the PTX that build.rs compiled from every `kernels/*.cu` (no GPU needed):
//! every declared kernel is an entry of its module, the NF4 dequantization kernels are FMA-free
//! with their code table bit-identical to the CPU's, and nothing targets more than sm_80.
#![cfg(feature = "cuda")]

use rupantor_quant::cuda::{self, NF4_ENTRY_POINTS};
use rupantor_quant::NF4_CODE;
use std::path::{Path, PathBuf};

fn cu_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("kernels/ directory")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    files.sort();
    files
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

fn check_nf4(ptx: &str) {
    let entries = cuda::ptx_entry_points(ptx);
    for name in NF4_ENTRY_POINTS {
        assert!(
            entries.iter().any(|e| e == name),
            "{name} missing from PTX entries {entries:?}"
        );
    }
    // The dequantization kernels must be FMA-free (-fmad=false + __fmul_rn/__fadd_rn), which is
    // what makes them bit-exact with the CPU; the GEMV uses explicit FMAs on purpose.
    for name in [
        "kDequantizeNF4_f32",
        "kDequantizeNF4_bf16",
        "kDequantizeNF4_f16",
    ] {
        let body = entry_body(ptx, name);
        assert!(!body.contains("fma."), "{name} contains an FMA");
        assert!(body.contains("mul.rn.f32"), "{name} lacks mul.rn.f32");
        assert!(
            body.contains("add.rn.f32"),
            "{name} lacks add.rn.f32 (absmax offset)"
        );
    }
    assert!(entry_body(ptx, "kDequantizeNF4_bf16").contains("cvt.rn.bf16.f32"));
    assert!(entry_body(ptx, "kDequantizeNF4_f16").contains("cvt.rn.f16.f32"));
    // The compiled code table is bit-identical to the CPU's.
    let want: Vec<u8> = NF4_CODE.iter().flat_map(|c| c.to_le_bytes()).collect();
    assert_eq!(
        ptx_const_bytes(ptx, "kNf4Code"),
        want,
        "kNf4Code differs from NF4_CODE"
    );
}

#[test]
fn every_cu_file_is_an_embedded_module_with_its_kernels() {
    let files = cu_files();
    assert!(
        files.iter().any(|f| f.ends_with("nf4.cu")),
        "kernels/nf4.cu not found among {files:?}"
    );
    assert_eq!(cuda::MODULES.len(), files.len(), "one module per .cu file");
    for file in &files {
        let stem = file.file_stem().unwrap().to_string_lossy().into_owned();
        let src =
            std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let declared = declared_kernels(&src);
        assert!(
            !declared.is_empty(),
            "{stem}.cu declares no extern \"C\" __global__ kernels"
        );
        let ptx = cuda::module_ptx(&stem).unwrap_or_else(|e| panic!("{e}"));
        assert!(ptx.contains(".target sm_80"), "{stem}: PTX targets sm_80");
        let entries = cuda::ptx_entry_points(ptx);
        for k in &declared {
            assert!(
                entries.contains(k),
                "{stem}: declared kernel {k} missing from PTX {entries:?}"
            );
            assert!(
                ptx.contains(&format!(".visible .entry {k}(")),
                "{stem}: {k} is not a visible entry"
            );
        }
        if stem == "nf4" {
            check_nf4(ptx);
        }
        eprintln!("{stem}: {} kernels, PTX {} bytes", entries.len(), ptx.len());
    }
}

#[test]
fn an_unknown_module_is_a_clear_error() {
    let err = cuda::module_ptx("no_such_module").unwrap_err();
    assert!(err.to_string().contains("no_such_module"), "{err}");
}
