//! Run-time compiled CUDA kernels for NF4 (feature `cuda`): `kernels/nf4.cu` compiled with NVRTC
//! through cudarc, and launchers for dequantization (f32 / bf16 / f16, bit-exact with the CPU
//! codec) and the fused NF4 x bf16 GEMV used in decoding.
//!
//! Nothing here needs a CUDA toolkit at build time: cudarc loads `libnvrtc` and `libcuda` when
//! first used. [`nvrtc_library`] finds libnvrtc on the loader path (`LD_LIBRARY_PATH`) or in the
//! PyPI wheel `nvidia-cuda-nvrtc-cu12`, and [`cuda_include_dir`] finds `cuda_bf16.h` /
//! `cuda_fp16.h` (`CUDA_INCLUDE_DIR`, the wheel `nvidia-cuda-runtime-cu12`, or a toolkit).

use crate::blockwise8;
use crate::nf4::{Nf4Tensor, SourceDtype, BLOCKSIZE, NESTED_BLOCKSIZE};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr,
    DriverError, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys, Ptx};
use half::{bf16, f16};
use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Source of `kernels/nf4.cu`, embedded at build time.
pub const NF4_SOURCE: &str = include_str!("../../../kernels/nf4.cu");

/// The `extern "C"` entry points of `kernels/nf4.cu`.
pub const NF4_ENTRY_POINTS: [&str; 4] = [
    "kDequantizeNF4_f32",
    "kDequantizeNF4_bf16",
    "kDequantizeNF4_f16",
    "kGemvNF4_bf16",
];

/// Architecture [`compile_kernels`] targets: PTX for sm_80 (Ampere) runs on every later GPU.
pub const DEFAULT_ARCH: &str = "compute_80";

/// Threads per block of the dequantization kernels (fixed in the source as `DQ_THREADS`).
pub const DEQUANT_THREADS: u32 = 256;
/// Packed 4-byte words one dequantization thread block expands (`DQ_TILE_WORDS`).
pub const DEQUANT_TILE_WORDS: u64 = 1024;
/// Output rows (one warp each) per GEMV thread block (`GEMV_WARPS`).
pub const GEMV_ROWS_PER_BLOCK: u32 = 8;

/// Errors of compilation, library discovery and kernel launches.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(
        "libnvrtc not found: nothing on the dynamic loader path (LD_LIBRARY_PATH) and none of {searched:?} \
         exists; `pip install nvidia-cuda-nvrtc-cu12` (see scripts/ci-nvrtc.sh) or add the directory holding \
         libnvrtc.so.12 to LD_LIBRARY_PATH"
    )]
    NvrtcNotFound { searched: Vec<PathBuf> },
    #[error("libnvrtc at {path} was loaded but cudarc still cannot bind it (its soname must be libnvrtc.so.12 or libnvrtc.so)")]
    NvrtcUnusable { path: PathBuf },
    #[error(
        "CUDA headers (cuda_bf16.h) not found in any of {searched:?}; set CUDA_INCLUDE_DIR or \
         `pip install nvidia-cuda-runtime-cu12`"
    )]
    IncludeDirNotFound { searched: Vec<PathBuf> },
    #[error("CUDA_INCLUDE_DIR={0} does not contain cuda_bf16.h")]
    BadIncludeDir(PathBuf),
    #[error(
        "NVRTC failed to compile {name} for {arch} ({status}); options {options:?}; log:\n{log}"
    )]
    Compile {
        name: String,
        arch: String,
        status: String,
        options: Vec<String>,
        log: String,
    },
    #[error("NVRTC call {call} failed: {status}")]
    Nvrtc { call: &'static str, status: String },
    #[error("the CUDA driver library (libcuda.so) is not installed")]
    NoDriver,
    #[error("no CUDA device is visible")]
    NoDevice,
    #[error("CUDA driver error while {what}: {source}")]
    Driver {
        what: &'static str,
        source: DriverError,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = CudaError> = std::result::Result<T, E>;

fn driver(what: &'static str) -> impl FnOnce(DriverError) -> CudaError {
    move |source| CudaError::Driver { what, source }
}

// ---------------------------------------------------------------------------------------------
// Discovery of libnvrtc and the CUDA headers
// ---------------------------------------------------------------------------------------------

/// `${XDG_CACHE_HOME:-$HOME/.cache}/rupantor`, where scripts/ci-nvrtc.sh keeps its venv.
fn rupantor_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("rupantor"))
}

/// Directories of the `nvidia` Python namespace package (the CUDA PyPI wheels): from the
/// interpreter in `RUPANTOR_PYTHON` / the active venv / `python3`, and from the venvs
/// scripts/ci-nvrtc.sh creates. Computed once.
pub fn nvidia_wheel_dirs() -> &'static [PathBuf] {
    static DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    DIRS.get_or_init(|| {
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut push = |p: PathBuf| {
            if p.is_dir() && !dirs.contains(&p) {
                dirs.push(p);
            }
        };
        let mut pythons: Vec<PathBuf> = Vec::new();
        if let Some(p) = std::env::var_os("RUPANTOR_PYTHON") {
            pythons.push(p.into());
        }
        if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
            pythons.push(PathBuf::from(v).join("bin/python"));
        }
        pythons.push("python3".into());
        const SCRIPT: &str = "import nvidia\nfor p in list(nvidia.__path__): print(p)";
        for py in pythons {
            let Ok(out) = std::process::Command::new(&py)
                .args(["-c", SCRIPT])
                .stderr(std::process::Stdio::null())
                .output()
            else {
                continue;
            };
            if out.status.success() {
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    push(PathBuf::from(line.trim()));
                }
            }
        }
        if let Some(cache) = rupantor_cache_dir() {
            for venv in ["nvrtc-venv", "cuda-venv"] {
                let lib = cache.join(venv).join("lib");
                let Ok(entries) = std::fs::read_dir(&lib) else {
                    continue;
                };
                let mut found: Vec<PathBuf> = entries
                    .flatten()
                    .map(|e| e.path().join("site-packages/nvidia"))
                    .filter(|p| p.is_dir())
                    .collect();
                found.sort();
                found.into_iter().for_each(&mut push);
            }
        }
        dirs
    })
}

/// Toolkit roots: `CUDA_HOME`, `CUDA_PATH`, `/usr/local/cuda`.
fn toolkit_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .collect();
    roots.push("/usr/local/cuda".into());
    roots
}

/// Where the CUDA headers may be, in search order (after `CUDA_INCLUDE_DIR`).
fn include_dir_candidates() -> Vec<PathBuf> {
    let mut c = Vec::new();
    for d in nvidia_wheel_dirs() {
        c.push(d.join("cuda_runtime/include"));
        c.push(d.join("cu13/include"));
    }
    for r in toolkit_roots() {
        c.push(r.join("include"));
        c.push(r.join("targets/x86_64-linux/include"));
    }
    c
}

/// The directory holding `cuda_bf16.h` and `cuda_fp16.h`: `CUDA_INCLUDE_DIR` if set (it must
/// hold them), else the `nvidia-cuda-runtime-cu12` wheel (`nvidia/cuda_runtime/include`, or
/// `nvidia/cu13/include`), else `$CUDA_HOME/include`, `$CUDA_PATH/include`,
/// `/usr/local/cuda/include`.
pub fn cuda_include_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CUDA_INCLUDE_DIR").filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        return if dir.join("cuda_bf16.h").is_file() {
            Ok(dir)
        } else {
            Err(CudaError::BadIncludeDir(dir))
        };
    }
    let searched = include_dir_candidates();
    searched
        .iter()
        .find(|d| d.join("cuda_bf16.h").is_file() && d.join("cuda_fp16.h").is_file())
        .cloned()
        .ok_or(CudaError::IncludeDirNotFound { searched })
}

/// Files that may be libnvrtc, in search order, when the loader path has none: `RUPANTOR_NVRTC_LIB`,
/// next to `CUDA_INCLUDE_DIR`'s wheel, the `nvidia-cuda-nvrtc-cu12` wheel, a toolkit's lib64.
fn nvrtc_candidates() -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(p) = std::env::var_os("RUPANTOR_NVRTC_LIB").filter(|v| !v.is_empty()) {
        c.push(PathBuf::from(p));
    }
    if let Some(inc) = std::env::var_os("CUDA_INCLUDE_DIR").filter(|v| !v.is_empty()) {
        let inc = PathBuf::from(inc);
        if let Some(nvidia) = inc.parent().and_then(Path::parent) {
            c.push(nvidia.join("cuda_nvrtc/lib/libnvrtc.so.12"));
        }
        if let Some(root) = inc.parent() {
            c.push(root.join("lib64/libnvrtc.so.12"));
            c.push(root.join("lib64/libnvrtc.so"));
        }
    }
    for d in nvidia_wheel_dirs() {
        c.push(d.join("cuda_nvrtc/lib/libnvrtc.so.12"));
    }
    for r in toolkit_roots() {
        c.push(r.join("lib64/libnvrtc.so.12"));
        c.push(r.join("lib64/libnvrtc.so"));
        c.push(r.join("targets/x86_64-linux/lib/libnvrtc.so.12"));
    }
    c
}

/// A usable libnvrtc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvrtcLibrary {
    /// The file preloaded from a wheel or toolkit; `None` when the dynamic loader found it itself.
    pub preloaded: Option<PathBuf>,
    /// `nvrtcVersion()`.
    pub version: (i32, i32),
}

/// Why libnvrtc could not be loaded (kept in a `OnceLock`, so `Clone`).
#[derive(Debug, Clone)]
enum NvrtcLoadError {
    NotFound(Vec<PathBuf>),
    Unusable(PathBuf),
    Call(&'static str, String),
}

impl From<NvrtcLoadError> for CudaError {
    fn from(e: NvrtcLoadError) -> Self {
        match e {
            NvrtcLoadError::NotFound(searched) => CudaError::NvrtcNotFound { searched },
            NvrtcLoadError::Unusable(path) => CudaError::NvrtcUnusable { path },
            NvrtcLoadError::Call(call, status) => CudaError::Nvrtc { call, status },
        }
    }
}

fn nvrtc_version() -> std::result::Result<(i32, i32), NvrtcLoadError> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: libnvrtc is loaded (checked by the caller); both pointers are valid.
    let status = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    status
        .result()
        .map_err(|e| NvrtcLoadError::Call("nvrtcVersion", format!("{e:?}")))?;
    Ok((major, minor))
}

/// Make libnvrtc loadable by cudarc, once per process. cudarc dlopens it by soname
/// (`libnvrtc.so`, `libnvrtc.so.12`, ...), which only searches the loader path; when that has
/// none, the first existing candidate file is dlopened by absolute path and kept open, so
/// cudarc's later dlopen by soname resolves to the same, already loaded, library.
pub fn nvrtc_library() -> Result<NvrtcLibrary> {
    static LIB: OnceLock<std::result::Result<NvrtcLibrary, NvrtcLoadError>> = OnceLock::new();
    static PRELOADED: OnceLock<libloading::Library> = OnceLock::new();
    let found = LIB.get_or_init(|| {
        // SAFETY: is_culib_present only dlopens/dlcloses candidate names.
        if unsafe { nvrtc_sys::is_culib_present() } {
            return Ok(NvrtcLibrary {
                preloaded: None,
                version: nvrtc_version()?,
            });
        }
        let searched = nvrtc_candidates();
        for path in searched.iter().filter(|p| p.is_file()) {
            // SAFETY: loading libnvrtc runs no initialisers with preconditions.
            let Ok(lib) = (unsafe { libloading::Library::new(path) }) else {
                continue;
            };
            let _ = PRELOADED.set(lib);
            // SAFETY: as above.
            if !unsafe { nvrtc_sys::is_culib_present() } {
                return Err(NvrtcLoadError::Unusable(path.clone()));
            }
            return Ok(NvrtcLibrary {
                preloaded: Some(path.clone()),
                version: nvrtc_version()?,
            });
        }
        Err(NvrtcLoadError::NotFound(searched))
    });
    found.clone().map_err(CudaError::from)
}

// ---------------------------------------------------------------------------------------------
// Compilation
// ---------------------------------------------------------------------------------------------

/// NVRTC options for `arch` (`compute_XY` for PTX, `sm_XY` for PTX + CUBIN).
///
/// `--fmad=false` stops the compiler contracting `a * b + c` into an FMA (the kernels also use
/// explicit `__fmul_rn` / `__fadd_rn`), and `--ftz=false` keeps f32 subnormals, so dequantized
/// values are bit-identical to the CPU codec.
pub fn nvrtc_options(arch: &str, include_dir: &Path) -> Vec<String> {
    vec![
        "--fmad=false".into(),
        "--ftz=false".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "-default-device".into(),
        "--std=c++17".into(),
        format!("--gpu-architecture={arch}"),
        format!("--include-path={}", include_dir.display()),
    ]
}

/// A compiled `.cu` file.
#[derive(Debug, Clone)]
pub struct CompiledKernels {
    pub name: String,
    pub arch: String,
    pub options: Vec<String>,
    /// PTX text (always produced).
    pub ptx: String,
    /// Device code for a real architecture (`sm_XY`), which loads without driver JIT.
    pub cubin: Option<Vec<u8>>,
    /// NVRTC's log (warnings; empty on a clean compile).
    pub log: String,
}

impl CompiledKernels {
    /// What to load into a module: the CUBIN when there is one, else the PTX.
    pub fn module_image(&self) -> Ptx {
        match &self.cubin {
            Some(bin) => Ptx::from_binary(bin.clone()),
            None => Ptx::from_src(self.ptx.clone()),
        }
    }

    /// Names of the `.entry` functions in the PTX.
    pub fn entry_points(&self) -> Vec<String> {
        ptx_entry_points(&self.ptx)
    }
}

/// Names of the `.entry` functions declared in PTX text.
pub fn ptx_entry_points(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|line| {
            let rest = &line[line.find(".entry ")? + ".entry ".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// Owns an nvrtcProgram and destroys it on drop.
struct Program {
    prog: nvrtc_sys::nvrtcProgram,
    _src: CString,
    _name: CString,
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: `prog` came from create_program and is destroyed once.
        let _ = unsafe { nvrtc_result::destroy_program(self.prog) };
    }
}

fn c_chars_to_string(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compile CUDA source `src` (named `name` in diagnostics) for `arch` with [`nvrtc_options`].
/// Errors carry NVRTC's log.
pub fn compile_source(name: &str, src: &str, arch: &str) -> Result<CompiledKernels> {
    nvrtc_library()?;
    let include_dir = cuda_include_dir()?;
    let options = nvrtc_options(arch, &include_dir);
    let src_c =
        CString::new(src).map_err(|_| CudaError::Invalid(format!("{name} contains a NUL byte")))?;
    let name_c = CString::new(name)
        .map_err(|_| CudaError::Invalid(format!("name {name:?} contains a NUL byte")))?;
    let prog =
        nvrtc_result::create_program(&src_c, Some(&name_c)).map_err(|e| CudaError::Nvrtc {
            call: "nvrtcCreateProgram",
            status: format!("{e:?}"),
        })?;
    let prog = Program {
        prog,
        _src: src_c,
        _name: name_c,
    };
    // SAFETY: `prog.prog` is a live program for all calls below.
    let compiled = unsafe { nvrtc_result::compile_program(prog.prog, &options) };
    let log = unsafe { nvrtc_result::get_program_log(prog.prog) }
        .map(|l| c_chars_to_string(&l))
        .unwrap_or_default();
    if let Err(e) = compiled {
        return Err(CudaError::Compile {
            name: name.to_string(),
            arch: arch.to_string(),
            status: format!("{:?}", e.0),
            options,
            log,
        });
    }
    let ptx = unsafe { nvrtc_result::get_ptx(prog.prog) }.map_err(|e| CudaError::Nvrtc {
        call: "nvrtcGetPTX",
        status: format!("{e:?}"),
    })?;
    let ptx = c_chars_to_string(&ptx);
    let cubin = if arch.starts_with("sm_") {
        let mut size = 0usize;
        unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog.prog, &mut size) }
            .result()
            .map_err(|e| CudaError::Nvrtc {
                call: "nvrtcGetCUBINSize",
                status: format!("{e:?}"),
            })?;
        let mut bin = vec![0u8; size];
        unsafe { nvrtc_sys::nvrtcGetCUBIN(prog.prog, bin.as_mut_ptr().cast()) }
            .result()
            .map_err(|e| CudaError::Nvrtc {
                call: "nvrtcGetCUBIN",
                status: format!("{e:?}"),
            })?;
        Some(bin)
    } else {
        None
    };
    Ok(CompiledKernels {
        name: name.to_string(),
        arch: arch.to_string(),
        options,
        ptx,
        cubin,
        log,
    })
}

/// Compile CUDA source to PTX for [`DEFAULT_ARCH`] (sm_80 and later).
pub fn compile_kernels(src: &str) -> Result<Ptx> {
    Ok(compile_source("kernels.cu", src, DEFAULT_ARCH)?.module_image())
}

// ---------------------------------------------------------------------------------------------
// Devices and launchers
// ---------------------------------------------------------------------------------------------

/// Number of CUDA devices; `Err(NoDriver)` when libcuda is not installed.
pub fn cuda_device_count() -> Result<usize> {
    // SAFETY: only dlopens/dlcloses candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    let n = CudaContext::device_count().map_err(driver("counting devices"))?;
    Ok(n.max(0) as usize)
}

/// Output element types of the dequantization kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDtype {
    F32,
    Bf16,
    F16,
}

impl OutDtype {
    pub fn size(self) -> usize {
        match self {
            OutDtype::F32 => 4,
            OutDtype::Bf16 | OutDtype::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OutDtype::F32 => "f32",
            OutDtype::Bf16 => "bf16",
            OutDtype::F16 => "f16",
        }
    }
}

impl From<SourceDtype> for OutDtype {
    fn from(d: SourceDtype) -> Self {
        match d {
            SourceDtype::F32 => OutDtype::F32,
            SourceDtype::Bf16 => OutDtype::Bf16,
            SourceDtype::F16 => OutDtype::F16,
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// Element types a dequantization kernel writes.
pub trait Nf4Output: DeviceRepr + ValidAsZeroBits + Copy + sealed::Sealed {
    const DTYPE: OutDtype;
}
impl Nf4Output for f32 {
    const DTYPE: OutDtype = OutDtype::F32;
}
impl Nf4Output for bf16 {
    const DTYPE: OutDtype = OutDtype::Bf16;
}
impl Nf4Output for f16 {
    const DTYPE: OutDtype = OutDtype::F16;
}

/// An NF4 tensor resident on the GPU (the same arrays as [`Nf4Tensor`]).
pub struct Nf4Device {
    pub packed: CudaSlice<u8>,
    pub absmax_codes: CudaSlice<u8>,
    pub nested_absmax: CudaSlice<f32>,
    pub offset: f32,
    pub shape: Vec<usize>,
    pub dtype: SourceDtype,
    numel: usize,
}

impl Nf4Device {
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Device bytes the kernels read to expand the whole tensor.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + self.absmax_codes.len() + 4 * self.nested_absmax.len()
    }
}

/// The NF4 kernels loaded on one device, with the nested (double-quant) map resident.
pub struct Nf4Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    dequant_f32: CudaFunction,
    dequant_bf16: CudaFunction,
    dequant_f16: CudaFunction,
    gemv_bf16: CudaFunction,
    nested_map: CudaSlice<f32>,
}

impl Nf4Cuda {
    /// Open device `ordinal` and load the kernels compiled for its architecture.
    pub fn new(ordinal: usize) -> Result<Self> {
        match cuda_device_count()? {
            0 => return Err(CudaError::NoDevice),
            n if ordinal >= n => {
                return Err(CudaError::Invalid(format!(
                    "device {ordinal} requested, {n} present"
                )))
            }
            _ => {}
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("creating a context"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver("querying the compute capability"))?;
        Self::with_context(ctx, &format!("sm_{major}{minor}"))
    }

    /// Load the kernels into `ctx`, compiled for `arch` (`sm_XY`: CUBIN, no driver JIT;
    /// `compute_XY`: PTX, JIT-compiled by the driver).
    pub fn with_context(ctx: Arc<CudaContext>, arch: &str) -> Result<Self> {
        let compiled = compile_source("nf4.cu", NF4_SOURCE, arch)?;
        let module = ctx
            .load_module(compiled.module_image())
            .map_err(driver("loading the nf4 module"))?;
        let load = |name: &str| {
            module
                .load_function(name)
                .map_err(driver("looking up a kernel"))
        };
        let stream = ctx.default_stream();
        let nested_map = stream
            .clone_htod(&blockwise8::dynamic_map(true))
            .map_err(driver("uploading the nested map"))?;
        Ok(Nf4Cuda {
            dequant_f32: load("kDequantizeNF4_f32")?,
            dequant_bf16: load("kDequantizeNF4_bf16")?,
            dequant_f16: load("kDequantizeNF4_f16")?,
            gemv_bf16: load("kGemvNF4_bf16")?,
            ctx,
            stream,
            arch: arch.to_string(),
            nested_map,
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The architecture the module was compiled for.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Copy an NF4 tensor to the device.
    pub fn upload(&self, t: &Nf4Tensor) -> Result<Nf4Device> {
        let n = t.numel();
        if n == 0 {
            return Err(CudaError::Invalid(
                "cannot upload an empty NF4 tensor".into(),
            ));
        }
        let blocks = n.div_ceil(BLOCKSIZE);
        let expect = [
            ("packed bytes", t.packed.len(), n.div_ceil(2)),
            ("absmax codes", t.absmax.codes.len(), blocks),
            (
                "nested absmax",
                t.absmax.nested_absmax.len(),
                blocks.div_ceil(NESTED_BLOCKSIZE),
            ),
        ];
        for (what, got, want) in expect {
            if got != want {
                return Err(CudaError::Invalid(format!(
                    "NF4 tensor {:?}: {got} {what}, expected {want}",
                    t.shape
                )));
            }
        }
        let up = "uploading an NF4 tensor";
        Ok(Nf4Device {
            packed: self.stream.clone_htod(&t.packed).map_err(driver(up))?,
            absmax_codes: self
                .stream
                .clone_htod(&t.absmax.codes)
                .map_err(driver(up))?,
            nested_absmax: self
                .stream
                .clone_htod(&t.absmax.nested_absmax)
                .map_err(driver(up))?,
            offset: t.absmax.offset,
            shape: t.shape.clone(),
            dtype: t.dtype,
            numel: n,
        })
    }

    fn dequant_function(&self, d: OutDtype) -> &CudaFunction {
        match d {
            OutDtype::F32 => &self.dequant_f32,
            OutDtype::Bf16 => &self.dequant_bf16,
            OutDtype::F16 => &self.dequant_f16,
        }
    }

    /// Launch geometry of the dequantization kernels for `n` elements.
    pub fn dequant_launch_config(n: usize) -> LaunchConfig {
        let words = (n as u64).div_ceil(2).div_ceil(4);
        let blocks = words.div_ceil(DEQUANT_TILE_WORDS);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (DEQUANT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Dequantize into `out` (exactly `numel` elements; any alignment, 16-byte aligned is fastest).
    pub fn dequantize_into<T: Nf4Output>(
        &self,
        w: &Nf4Device,
        out: &mut CudaViewMut<'_, T>,
    ) -> Result<()> {
        if out.len() != w.numel {
            return Err(CudaError::Invalid(format!(
                "output holds {} elements, tensor has {}",
                out.len(),
                w.numel
            )));
        }
        let cfg = Self::dequant_launch_config(w.numel);
        if u64::from(cfg.grid_dim.0)
            != (w.numel as u64)
                .div_ceil(2)
                .div_ceil(4)
                .div_ceil(DEQUANT_TILE_WORDS)
        {
            return Err(CudaError::Invalid(format!(
                "{} elements exceed one launch",
                w.numel
            )));
        }
        let n = w.numel as u64;
        let mut launch = self.stream.launch_builder(self.dequant_function(T::DTYPE));
        launch
            .arg(&w.packed)
            .arg(&w.absmax_codes)
            .arg(&w.nested_absmax)
            .arg(&self.nested_map)
            .arg(&w.offset)
            .arg(out)
            .arg(&n);
        // SAFETY: the argument list matches kDequantizeNF4_* (u8*, u8*, f32*, f32*, f32, T*, u64);
        // the arrays were length-checked in `upload` and above, so all accesses stay in bounds.
        unsafe { launch.launch(cfg) }.map_err(driver("launching kDequantizeNF4"))?;
        Ok(())
    }

    fn dequantize<T: Nf4Output>(&self, w: &Nf4Device) -> Result<CudaSlice<T>> {
        // SAFETY: the kernel writes every element before anything reads the slice.
        let mut out =
            unsafe { self.stream.alloc::<T>(w.numel) }.map_err(driver("allocating the output"))?;
        self.dequantize_into(w, &mut out.as_view_mut())?;
        Ok(out)
    }

    /// NF4 -> f32, bit-identical to [`Nf4Tensor::dequantize`].
    pub fn dequantize_f32(&self, w: &Nf4Device) -> Result<CudaSlice<f32>> {
        self.dequantize(w)
    }

    /// NF4 -> bf16 (round to nearest even), bit-identical to [`Nf4Tensor::dequantize_bf16`].
    pub fn dequantize_bf16(&self, w: &Nf4Device) -> Result<CudaSlice<bf16>> {
        self.dequantize(w)
    }

    /// NF4 -> f16 (round to nearest even), bit-identical to [`Nf4Tensor::dequantize_f16`].
    pub fn dequantize_f16(&self, w: &Nf4Device) -> Result<CudaSlice<f16>> {
        self.dequantize(w)
    }

    /// `[out, in]` of a 2-D weight.
    fn gemv_dims(w: &Nf4Device) -> Result<(usize, usize)> {
        match w.shape[..] {
            [o, i] if o > 0 && i > 0 && o <= i32::MAX as usize && i <= i32::MAX as usize => {
                Ok((o, i))
            }
            _ => Err(CudaError::Invalid(format!(
                "GEMV needs a 2-D [out, in] weight within i32, got {:?}",
                w.shape
            ))),
        }
    }

    /// `y[batch, out] = x[batch, in] . W^T` into `y`, with W `[out, in]` in NF4 (see kernels/README.md).
    pub fn gemv_bf16_into(
        &self,
        w: &Nf4Device,
        x: &CudaView<'_, bf16>,
        batch: usize,
        y: &mut CudaViewMut<'_, bf16>,
    ) -> Result<()> {
        let (out_features, in_features) = Self::gemv_dims(w)?;
        if batch == 0 || batch > i32::MAX as usize {
            return Err(CudaError::Invalid(format!("batch {batch} out of range")));
        }
        if x.len() != batch * in_features || y.len() != batch * out_features {
            return Err(CudaError::Invalid(format!(
                "GEMV shapes: x has {} elements (want {batch}x{in_features}), y has {} (want {batch}x{out_features})",
                x.len(),
                y.len()
            )));
        }
        let cfg = LaunchConfig {
            grid_dim: ((out_features as u32).div_ceil(GEMV_ROWS_PER_BLOCK), 1, 1),
            block_dim: (GEMV_ROWS_PER_BLOCK * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (b, i, o) = (batch as i32, in_features as i32, out_features as i32);
        let mut launch = self.stream.launch_builder(&self.gemv_bf16);
        launch
            .arg(&w.packed)
            .arg(&w.absmax_codes)
            .arg(&w.nested_absmax)
            .arg(&self.nested_map)
            .arg(&w.offset)
            .arg(x)
            .arg(y)
            .arg(&b)
            .arg(&i)
            .arg(&o);
        // SAFETY: arguments match kGemvNF4_bf16 (u8*, u8*, f32*, f32*, f32, bf16*, bf16*, int, int,
        // int); x, y and W were size-checked above.
        unsafe { launch.launch(cfg) }.map_err(driver("launching kGemvNF4_bf16"))?;
        Ok(())
    }

    /// `y[batch, out] = x[batch, in] . W^T`, allocating `y`.
    pub fn gemv_bf16(
        &self,
        w: &Nf4Device,
        x: &CudaSlice<bf16>,
        batch: usize,
    ) -> Result<CudaSlice<bf16>> {
        let (out_features, _) = Self::gemv_dims(w)?;
        // SAFETY: the kernel writes all batch * out elements.
        let mut y = unsafe { self.stream.alloc::<bf16>(batch * out_features) }
            .map_err(driver("allocating y"))?;
        self.gemv_bf16_into(w, &x.as_view(), batch, &mut y.as_view_mut())?;
        Ok(y)
    }

    /// Time dequantization of `w` to `dtype` against a device-to-device copy of the same output
    /// size, in the same run, with CUDA events: `rounds` rounds of `iters` back-to-back launches
    /// (and copies) each, after a warm-up; the fastest round of each counts.
    pub fn measure_dequant_bandwidth(
        &self,
        w: &Nf4Device,
        dtype: OutDtype,
        rounds: usize,
        iters: usize,
    ) -> Result<BandwidthReport> {
        match dtype {
            OutDtype::F32 => self.measure::<f32>(w, rounds, iters),
            OutDtype::Bf16 => self.measure::<bf16>(w, rounds, iters),
            OutDtype::F16 => self.measure::<f16>(w, rounds, iters),
        }
    }

    fn measure<T: Nf4Output>(
        &self,
        w: &Nf4Device,
        rounds: usize,
        iters: usize,
    ) -> Result<BandwidthReport> {
        if rounds == 0 || iters == 0 {
            return Err(CudaError::Invalid(
                "rounds and iters must be positive".into(),
            ));
        }
        use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        let out_bytes = w.numel * T::DTYPE.size();
        let mut out = self
            .stream
            .alloc_zeros::<T>(w.numel)
            .map_err(driver("allocating the output"))?;
        let src = self
            .stream
            .alloc_zeros::<u8>(out_bytes)
            .map_err(driver("allocating the copy source"))?;
        let mut dst = self
            .stream
            .alloc_zeros::<u8>(out_bytes)
            .map_err(driver("allocating the copy target"))?;
        let timing = "timing with events";
        for _ in 0..2 {
            self.dequantize_into(w, &mut out.as_view_mut())?;
            self.stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(driver("copying"))?;
        }
        let (mut best_dequant, mut best_copy) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..rounds {
            let start = self
                .stream
                .record_event(Some(CU_EVENT_DEFAULT))
                .map_err(driver(timing))?;
            for _ in 0..iters {
                self.dequantize_into(w, &mut out.as_view_mut())?;
            }
            let end = self
                .stream
                .record_event(Some(CU_EVENT_DEFAULT))
                .map_err(driver(timing))?;
            best_dequant =
                best_dequant.min(f64::from(start.elapsed_ms(&end).map_err(driver(timing))?));
            let start = self
                .stream
                .record_event(Some(CU_EVENT_DEFAULT))
                .map_err(driver(timing))?;
            for _ in 0..iters {
                self.stream
                    .memcpy_dtod(&src, &mut dst)
                    .map_err(driver("copying"))?;
            }
            let end = self
                .stream
                .record_event(Some(CU_EVENT_DEFAULT))
                .map_err(driver(timing))?;
            best_copy = best_copy.min(f64::from(start.elapsed_ms(&end).map_err(driver(timing))?));
        }
        self.stream.synchronize().map_err(driver("synchronizing"))?;
        Ok(BandwidthReport::new(
            T::DTYPE,
            w.numel,
            w.storage_bytes(),
            iters,
            best_dequant / iters as f64,
            best_copy / iters as f64,
        ))
    }
}

/// Dequantization throughput next to a device-to-device copy of the same output size.
#[derive(Debug, Clone, PartialEq)]
pub struct BandwidthReport {
    pub dtype: OutDtype,
    pub numel: usize,
    /// Bytes dequantization writes (`numel * size_of(dtype)`), also the size of the copy.
    pub output_bytes: usize,
    /// Bytes dequantization reads (packed codes, absmax codes, nested scales).
    pub input_bytes: usize,
    pub iters: usize,
    /// Milliseconds per dequantization (best round).
    pub dequant_ms: f64,
    /// Milliseconds per copy (best round).
    pub copy_ms: f64,
}

impl BandwidthReport {
    pub fn new(
        dtype: OutDtype,
        numel: usize,
        input_bytes: usize,
        iters: usize,
        dequant_ms: f64,
        copy_ms: f64,
    ) -> Self {
        BandwidthReport {
            dtype,
            numel,
            output_bytes: numel * dtype.size(),
            input_bytes,
            iters,
            dequant_ms,
            copy_ms,
        }
    }

    /// Output bytes written per second by dequantization, in GB/s (1e9 bytes).
    pub fn dequant_gbps(&self) -> f64 {
        self.output_bytes as f64 / (self.dequant_ms * 1e-3) / 1e9
    }

    /// Output bytes written per second by the copy, in GB/s.
    pub fn copy_gbps(&self) -> f64 {
        self.output_bytes as f64 / (self.copy_ms * 1e-3) / 1e9
    }

    /// DRAM traffic of dequantization (reads + writes), in GB/s.
    pub fn dequant_traffic_gbps(&self) -> f64 {
        (self.output_bytes + self.input_bytes) as f64 / (self.dequant_ms * 1e-3) / 1e9
    }

    /// DRAM traffic of the copy (reads + writes), in GB/s.
    pub fn copy_traffic_gbps(&self) -> f64 {
        2.0 * self.output_bytes as f64 / (self.copy_ms * 1e-3) / 1e9
    }

    /// Dequantization output rate over copy output rate (1.0 = as fast as a copy).
    pub fn ratio(&self) -> f64 {
        self.copy_ms / self.dequant_ms
    }
}

impl std::fmt::Display for BandwidthReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NF4->{} {} elements: dequant {:.1} GB/s out ({:.1} GB/s traffic, {:.3} ms), d2d copy {:.1} GB/s out \
             ({:.1} GB/s traffic, {:.3} ms), ratio {:.2}",
            self.dtype.name(),
            self.numel,
            self.dequant_gbps(),
            self.dequant_traffic_gbps(),
            self.dequant_ms,
            self.copy_gbps(),
            self.copy_traffic_gbps(),
            self.copy_ms,
            self.ratio()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nf4::NF4_CODE;

    /// The NF4 table literal in kernels/nf4.cu, parsed as f32 the way C parses `...f` literals.
    fn source_table() -> Vec<f32> {
        let start = NF4_SOURCE
            .find("kNf4Code[16] = {")
            .expect("kNf4Code table in nf4.cu");
        let body = &NF4_SOURCE[start..];
        let body = &body[body.find('{').unwrap() + 1..body.find("};").unwrap()];
        body.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.trim_end_matches('f')
                    .parse::<f32>()
                    .unwrap_or_else(|e| panic!("literal {s:?}: {e}"))
            })
            .collect()
    }

    #[test]
    fn kernel_table_matches_the_cpu_codes_bit_for_bit() {
        let table = source_table();
        assert_eq!(table.len(), 16);
        for (i, (k, c)) in table.iter().zip(NF4_CODE.iter()).enumerate() {
            assert_eq!(k.to_bits(), c.to_bits(), "code {i}: kernel {k} vs CPU {c}");
        }
    }

    #[test]
    fn kernel_constants_match_the_source() {
        for (define, value) in [
            ("#define DQ_THREADS ", DEQUANT_THREADS as u64),
            (
                "#define DQ_WORDS_PER_THREAD ",
                DEQUANT_TILE_WORDS / DEQUANT_THREADS as u64,
            ),
            ("#define GEMV_WARPS ", GEMV_ROWS_PER_BLOCK as u64),
            ("#define NF4_BLOCK ", BLOCKSIZE as u64),
            ("#define NESTED_BLOCK ", NESTED_BLOCKSIZE as u64),
        ] {
            let line = NF4_SOURCE
                .lines()
                .find(|l| l.starts_with(define))
                .unwrap_or_else(|| panic!("{define} missing"));
            let n: u64 = line[define.len()..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(n, value, "{define}");
        }
        for name in NF4_ENTRY_POINTS {
            assert!(
                NF4_SOURCE.contains(&format!("{name}(")),
                "{name} missing from nf4.cu"
            );
        }
    }

    #[test]
    fn launch_geometry_covers_every_word() {
        for n in [1usize, 2, 8, 9, 8191, 8192, 8193, 64 * 256 * 3 + 17] {
            let cfg = Nf4Cuda::dequant_launch_config(n);
            let words = n.div_ceil(2).div_ceil(4) as u64;
            let covered = u64::from(cfg.grid_dim.0) * DEQUANT_TILE_WORDS;
            assert!(
                covered >= words && covered - words < DEQUANT_TILE_WORDS,
                "n={n}"
            );
            assert_eq!(cfg.block_dim.0, DEQUANT_THREADS);
        }
    }

    #[test]
    fn entry_points_are_read_from_ptx() {
        let ptx = ".visible .entry kA(\n\t.param .u64 p\n)\n.visible .entry k_B2(\n";
        assert_eq!(
            ptx_entry_points(ptx),
            vec!["kA".to_string(), "k_B2".to_string()]
        );
    }

    #[test]
    fn options_disable_fma_contraction_and_flushing() {
        let opts = nvrtc_options("sm_90", Path::new("/x/include"));
        for o in [
            "--fmad=false",
            "--ftz=false",
            "-default-device",
            "--std=c++17",
            "--gpu-architecture=sm_90",
        ] {
            assert!(opts.iter().any(|s| s == o), "{o} missing from {opts:?}");
        }
        assert!(opts.contains(&"--include-path=/x/include".to_string()));
    }

    #[test]
    fn bandwidth_report_arithmetic() {
        // 1e6 f32 = 4 MB out in 0.01 ms -> 400 GB/s; the copy takes 0.008 ms -> 500 GB/s.
        let r = BandwidthReport::new(OutDtype::F32, 1_000_000, 500_000, 10, 0.01, 0.008);
        assert!((r.dequant_gbps() - 400.0).abs() < 1e-9);
        assert!((r.copy_gbps() - 500.0).abs() < 1e-9);
        assert!((r.ratio() - 0.8).abs() < 1e-12);
        assert!((r.copy_traffic_gbps() - 1000.0).abs() < 1e-9);
        assert!((r.dequant_traffic_gbps() - 450.0).abs() < 1e-9);
        assert!(r.to_string().contains("ratio 0.80"));
    }
}
