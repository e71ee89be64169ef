//! Opening a compute device, and what the rest of rupantor asks of it: one-line errors for a
//! build without CUDA, a missing driver or a missing GPU; the peak of GPU memory in use (for
//! benchmarks and reports); and errors that name what to lower when the GPU runs out of memory.
//!
//! The device runs everything on one stream (see [`cuda`]).
//!
//! candle allocates through cudarc, which takes stream-ordered allocations from the device's
//! default memory pool. That pool hands freed memory back to the driver at every
//! synchronisation unless its release threshold says otherwise, and a train step synchronises
//! often (loss values, gradient norms): [`cuda`] raises the threshold so freed blocks stay in
//! the pool for the next allocation, as PyTorch's caching allocator does. The pool also keeps
//! the high-water mark of memory in use, which [`peak_memory`] reads.

use candle_core::Device;

/// Why a device could not be opened; each a single line naming the fix.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "--device cuda: this rupantor was built without CUDA; rebuild it with \
         `source scripts/cuda-env.sh && cargo build --release --features cuda`"
    )]
    NotBuilt,
    #[error("--device cuda: {0}")]
    Unavailable(String),
}

/// CUDA device `ordinal`, with its memory pool set to cache freed blocks.
pub fn cuda(ordinal: usize) -> Result<Device, DeviceError> {
    #[cfg(feature = "cuda")]
    {
        rupantor_quant::cuda::check_device(ordinal)
            .map_err(|e| DeviceError::Unavailable(e.to_string()))?;
        // One stream of our own rather than CUDA's per-thread default stream: every kernel,
        // candle's and ours, and every copy is queued on it whatever thread issues it, so
        // work is ordered by the stream alone and cudarc's per-buffer event tracking (an event
        // recorded for every buffer of every launch, there to order work across streams) is
        // pure overhead, which is switched off.
        let dev = Device::new_cuda_with_stream(ordinal)
            .map_err(|e| DeviceError::Unavailable(e.to_string()))?;
        if let Device::Cuda(d) = &dev {
            // SAFETY: buffers of this device are only ever used on its one stream (above), so
            // no cross-stream ordering is needed.
            unsafe { d.disable_event_tracking() };
        }
        pool::keep_freed_memory(ordinal).map_err(DeviceError::Unavailable)?;
        Ok(dev)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(DeviceError::NotBuilt)
    }
}

/// The GPU a test runs on, by the policy every GPU test follows: when this machine has no
/// driver or no GPU (CI), `None`, after printing `SKIPPED <test>: <why>`; with
/// `RUPANTOR_REQUIRE_GPU=1` (a GPU session, the bundle) that is a failure instead, so a skip
/// cannot pass silently. A GPU that is there but cannot be opened always fails.
pub fn gpu_for_test(test: &str) -> Option<Device> {
    let required = std::env::var("RUPANTOR_REQUIRE_GPU").is_ok_and(|v| v == "1");
    #[cfg(feature = "cuda")]
    let absent = match rupantor_quant::cuda::cuda_device_count() {
        Ok(0) => "no CUDA device is visible".to_string(),
        Err(e @ rupantor_quant::cuda::CudaError::NoDriver) => e.to_string(),
        Ok(_) => {
            return Some(cuda(0).unwrap_or_else(|e| panic!("{test}: a GPU is present but {e}")))
        }
        Err(e) => panic!("{test}: {e}"),
    };
    #[cfg(not(feature = "cuda"))]
    let absent = DeviceError::NotBuilt.to_string();
    if required {
        panic!("{test}: RUPANTOR_REQUIRE_GPU=1 but {absent}");
    }
    eprintln!("SKIPPED {test}: {absent} (RUPANTOR_REQUIRE_GPU=1 makes this a failure)");
    None
}

/// Bytes of GPU memory in use at the high-water mark since the device was opened or since
/// [`reset_peak_memory`]; `None` on the CPU.
pub fn peak_memory(dev: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        return pool::used_high(d).ok();
    }
    let _ = dev;
    None
}

/// Starts a new high-water mark at the memory in use now (waits for queued work first).
pub fn reset_peak_memory(dev: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        let _ = pool::reset_used_high(d);
    }
    let _ = dev;
}

/// Bytes of GPU memory in use now (allocated from the pool); `None` on the CPU.
pub fn memory_in_use(dev: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        return pool::used_current(d).ok();
    }
    let _ = dev;
    None
}

/// Whether an error (anywhere in its chain) is the GPU running out of memory.
pub fn is_out_of_memory(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut e: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cur) = e {
        let s = cur.to_string();
        if s.contains("CUDA_ERROR_OUT_OF_MEMORY") || s.contains("out of memory") {
            return true;
        }
        e = cur.source();
    }
    false
}

/// The line a command prints when the GPU ran out of memory while doing `what`.
pub fn out_of_memory_hint(what: &str) -> String {
    format!(
        "out of GPU memory while {what}: lower the batch (--batch / micro_batch), the sequence \
         length (max_len) or the LoRA rank, or turn activation recompute on (recompute = true); \
         nothing was written for the step that failed"
    )
}

#[cfg(feature = "cuda")]
mod pool {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    use candle_core::cuda_backend::CudaDevice;
    use std::ffi::c_void;

    fn default_pool(ordinal: usize) -> Result<sys::CUmemoryPool, String> {
        let dev = result::device::get(ordinal as i32).map_err(|e| e.to_string())?;
        // SAFETY: `dev` came from cuDeviceGet.
        unsafe { result::device::get_default_mem_pool(dev) }.map_err(|e| e.to_string())
    }

    fn pool_of(d: &CudaDevice) -> Result<sys::CUmemoryPool, String> {
        default_pool(d.cuda_stream().context().ordinal())
    }

    pub fn keep_freed_memory(ordinal: usize) -> Result<(), String> {
        let pool = default_pool(ordinal)?;
        let mut threshold = u64::MAX;
        // SAFETY: a valid pool; the attribute takes a u64.
        unsafe {
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast::<c_void>(),
            )
        }
        .map_err(|e| format!("setting the memory pool's release threshold: {e}"))
    }

    fn get(d: &CudaDevice, attr: sys::CUmemPool_attribute) -> Result<u64, String> {
        let pool = pool_of(d)?;
        let mut v = 0u64;
        // SAFETY: a valid pool; the memory attributes are u64.
        unsafe { result::mem_pool::get_attribute(pool, attr, (&mut v as *mut u64).cast()) }
            .map_err(|e| e.to_string())?;
        Ok(v)
    }

    pub fn used_high(d: &CudaDevice) -> Result<u64, String> {
        d.cuda_stream().synchronize().map_err(|e| e.to_string())?;
        get(d, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }

    pub fn used_current(d: &CudaDevice) -> Result<u64, String> {
        d.cuda_stream().synchronize().map_err(|e| e.to_string())?;
        get(
            d,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
        )
    }

    pub fn reset_used_high(d: &CudaDevice) -> Result<(), String> {
        d.cuda_stream().synchronize().map_err(|e| e.to_string())?;
        let pool = pool_of(d)?;
        // Only zero is accepted: the mark restarts at the memory in use now.
        let mut zero = 0u64;
        // SAFETY: a valid pool; the attribute takes a u64.
        unsafe {
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero as *mut u64).cast::<c_void>(),
            )
        }
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_has_no_gpu_memory_figures() {
        assert_eq!(peak_memory(&Device::Cpu), None);
        assert_eq!(memory_in_use(&Device::Cpu), None);
        reset_peak_memory(&Device::Cpu);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_build_without_cuda_names_the_feature() {
        let e = cuda(0).unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
        assert_eq!(e.lines().count(), 1);
    }

    #[test]
    fn out_of_memory_is_recognised_through_the_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("step 3")]
        struct Outer(#[source] std::io::Error);
        let inner =
            std::io::Error::other("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
        assert!(is_out_of_memory(&Outer(inner)));
        assert!(!is_out_of_memory(&std::io::Error::other("file not found")));
        let hint = out_of_memory_hint("training step 3");
        for word in ["batch", "max_len", "recompute"] {
            assert!(hint.contains(word), "{hint}");
        }
    }
}
