// Gemma's RMSNorm, forward and backward, one pass per row (crates/model/src/ops/rms_norm.rs):
// the GPU twins of `fwd_row` and `bwd_row` there. For a row x of h elements (f32, bf16 or f16,
// widened to f32 exactly) and the f32 scale s = 1 + w:
//
//   inv   = 1 / sqrt(sum_j x_j^2 * inv_n + eps)          (inv_n = f32(1 / h), as candle's mean)
//   y_j   = (x_j * inv) * s_j                             (rounded once to the input's type)
//   dx_j  = inv * (g_j * s_j - (x_j * inv) * m),  m = sum_j (g_j * s_j) * (x_j * inv) * inv_n
//
// with g the upstream gradient (in x's type) and dx returned in x's type. The sums are in f32;
// every other step is an explicit round-to-nearest intrinsic (and the module is built with
// -fmad=false), so the only difference from the CPU is the order of the sums.
//
// Launch geometry: blockDim = (G, R), one row per group of G threads (a multiple of 32, at
// most 1024), R rows per block (G * R <= 1024), gridDim.x = ceil(rows / R). The launcher picks
// G = 32 (a warp per row, shuffles only) for short rows such as a head's 256 values, and a
// larger G for hidden-size rows, whose warps combine through shared memory.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// The sum of v over the G = blockDim.x threads of this row's group, the same value in every
// one of them. Every thread of the block must call it (it may wait at a barrier). The xor
// butterfly leaves identical sums in all lanes (each pair adds the same two values); for
// G > 32 every thread then adds the warp totals in the same fixed order, so the result is
// deterministic for a given geometry.
__device__ __forceinline__ float group_sum(float v, float* scratch) {
    for (int off = 16; off > 0; off >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, off));
    const int warps = blockDim.x / 32;
    if (warps == 1) return v;
    float* mine = scratch + threadIdx.y * warps;
    if (threadIdx.x % 32 == 0) mine[threadIdx.x / 32] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total = __fadd_rn(total, mine[w]);
    // The scratch is reused by the next sum.
    __syncthreads();
    return total;
}

__device__ __forceinline__ float inv_rms(float sum_sq, float inv_n, float eps) {
    return __frcp_rn(__fsqrt_rn(__fadd_rn(__fmul_rn(sum_sq, inv_n), eps)));
}

// This thread's row, and whether it exists: the last block may have fewer than R rows, but its
// idle groups still take part in the barriers of group_sum.
__device__ __forceinline__ long long group_row() {
    return static_cast<long long>(blockIdx.x) * blockDim.y + threadIdx.y;
}

template <typename T>
__device__ __forceinline__ void rms_norm_fwd(const T* __restrict__ x, const float* __restrict__ scale,
                                             T* __restrict__ y, int rows, int h, float inv_n,
                                             float eps) {
    __shared__ float scratch[32];
    const long long row = group_row();
    const bool live = row < rows;
    const long long base = (live ? row : 0) * static_cast<long long>(h);
    const T* xr = x + base;

    float ss = 0.0f;
    if (live) {
        for (int j = threadIdx.x; j < h; j += blockDim.x) {
            const float v = to_f32(xr[j]);
            ss = __fadd_rn(ss, __fmul_rn(v, v));
        }
    }
    const float inv = inv_rms(group_sum(ss, scratch), inv_n, eps);
    if (!live) return;
    T* yr = y + base;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        yr[j] = from_f32<T>(__fmul_rn(__fmul_rn(to_f32(xr[j]), inv), scale[j]));
    }
}

template <typename T>
__device__ __forceinline__ void rms_norm_bwd(const T* __restrict__ g, const T* __restrict__ x,
                                             const float* __restrict__ scale, T* __restrict__ dx,
                                             int rows, int h, float inv_n, float eps) {
    __shared__ float scratch[32];
    const long long row = group_row();
    const bool live = row < rows;
    const long long base = (live ? row : 0) * static_cast<long long>(h);
    const T* xr = x + base;
    const T* gr = g + base;

    float ss = 0.0f;
    if (live) {
        for (int j = threadIdx.x; j < h; j += blockDim.x) {
            const float v = to_f32(xr[j]);
            ss = __fadd_rn(ss, __fmul_rn(v, v));
        }
    }
    const float inv = inv_rms(group_sum(ss, scratch), inv_n, eps);

    float dot = 0.0f;
    if (live) {
        for (int j = threadIdx.x; j < h; j += blockDim.x) {
            const float gs = __fmul_rn(to_f32(gr[j]), scale[j]);
            dot = __fadd_rn(dot, __fmul_rn(gs, __fmul_rn(to_f32(xr[j]), inv)));
        }
    }
    const float m = __fmul_rn(group_sum(dot, scratch), inv_n);
    if (!live) return;
    T* dr = dx + base;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        const float gs = __fmul_rn(to_f32(gr[j]), scale[j]);
        const float xhat = __fmul_rn(to_f32(xr[j]), inv);
        dr[j] = from_f32<T>(__fmul_rn(inv, __fsub_rn(gs, __fmul_rn(xhat, m))));
    }
}

extern "C" __global__ void __launch_bounds__(1024)
kRmsNormFwd_f32(const float* __restrict__ x, const float* __restrict__ scale, float* __restrict__ y,
                int rows, int h, float inv_n, float eps) {
    rms_norm_fwd<float>(x, scale, y, rows, h, inv_n, eps);
}

extern "C" __global__ void __launch_bounds__(1024)
kRmsNormFwd_bf16(const __nv_bfloat16* __restrict__ x, const float* __restrict__ scale,
                 __nv_bfloat16* __restrict__ y, int rows, int h, float inv_n, float eps) {
    rms_norm_fwd<__nv_bfloat16>(x, scale, y, rows, h, inv_n, eps);
}

extern "C" __global__ void __launch_bounds__(1024)
kRmsNormFwd_f16(const __half* __restrict__ x, const float* __restrict__ scale, __half* __restrict__ y,
                int rows, int h, float inv_n, float eps) {
    rms_norm_fwd<__half>(x, scale, y, rows, h, inv_n, eps);
}

extern "C" __global__ void __launch_bounds__(1024)
kRmsNormBwd_f32(const float* __restrict__ g, const float* __restrict__ x,
                const float* __restrict__ scale, float* __restrict__ dx, int rows, int h,
                float inv_n, float eps) {
    rms_norm_bwd<float>(g, x, scale, dx, rows, h, inv_n, eps);
}

extern "C" __global__ void __launch_bounds__(1024)
kRmsNormBwd_bf16(const __nv_bfloat16* __restrict__ g, const __nv_bfloat16* __restrict__ x,
                 const float* __restrict__ scale, __nv_bfloat16* __restrict__ dx, int rows, int h,
                 float inv_n, float eps) {
    rms_norm_bwd<__nv_bfloat16>(g, x, scale, dx, rows, h, inv_n, eps);
}

extern "C" __global__ void __launch_bounds__(1024)
kRmsNormBwd_f16(const __half* __restrict__ g, const __half* __restrict__ x,
                const float* __restrict__ scale, __half* __restrict__ dx, int rows, int h,
                float inv_n, float eps) {
    rms_norm_bwd<__half>(g, x, scale, dx, rows, h, inv_n, eps);
}
