//! What the `cuda_fwd` halves of the model's custom ops share (feature `cuda`): our kernels
//! (`kernels/*.cu`, embedded as PTX by rupantor-quant) loaded once per candle device, on
//! candle's own stream so they are ordered with candle's kernels and read and write its
//! buffers in place; and small storage helpers.

use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, DeviceId};
use candle_core::{DType, Result};
use rupantor_quant::cuda::Nf4Cuda;

/// A candle error from any displayable one (driver and launcher errors keep their text, so
/// `CUDA_ERROR_OUT_OF_MEMORY` stays recognisable, see [`crate::device::is_out_of_memory`]).
pub(crate) fn err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::msg(e)
}

/// The NF4 launchers of `dev`, loaded on its stream the first time they are asked for.
pub(crate) fn nf4_kernels(dev: &CudaDevice) -> Result<Arc<Nf4Cuda>> {
    static CACHE: Mutex<Vec<(DeviceId, Arc<Nf4Cuda>)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().expect("nf4 kernel cache poisoned");
    if let Some((_, k)) = cache.iter().find(|(id, _)| *id == dev.id()) {
        return Ok(k.clone());
    }
    let k = Arc::new(Nf4Cuda::on_stream(dev.cuda_stream()).map_err(err)?);
    cache.push((dev.id(), k.clone()));
    Ok(k)
}

/// Kernel `name` of module `module` (`kernels/<module>.cu`), loaded into `dev` once (candle
/// caches the module); launch it on `dev.cuda_stream()`.
pub(crate) fn kernel(dev: &CudaDevice, module: &str, name: &str) -> Result<CudaFunction> {
    let ptx = rupantor_quant::cuda::module_ptx(module).map_err(err)?;
    Ok(dev
        .get_or_load_custom_func(name, module, ptx)?
        .into_cuda_function())
}

/// Wraps a slice as a storage of `dev`.
pub(crate) fn storage<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, dev.clone())
}

/// Names the dtypes an op supports when it meets another.
pub(crate) fn unsupported(op: &str, dtype: DType, wants: &str) -> candle_core::Error {
    err(format!(
        "{op}: {dtype:?} input on the GPU (supported: {wants})"
    ))
}
