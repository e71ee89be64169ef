// LoRA's inverted dropout with the mask of a SplitMix64 stream (crates/model/src/qlora.rs,
// `LoraDropout`): element i of x is kept, times `keep`, unless draw i + 1 of the stream
// positioned at `state` is below p; the product is formed in f32 and stored in the output type
// (the forward casts bf16/f16 activations to the adapter's f32 in the same pass; the backward
// returns the gradient in the activations' type). A SplitMix64 draw k is mix(state + k * gamma),
// so each thread computes its elements' draws on its own, bit-identical to the CPU's sequential
// stream: the 24-bit uniform (z >> 40) * 2^-24 is exact in f32, and the comparison, the product
// and the final rounding are the CPU's.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned long long u64;

#define SPLITMIX_GAMMA 0x9E3779B97F4A7C15ull

__device__ __forceinline__ u64 splitmix_draw(u64 state, u64 k) {
    u64 z = state + k * SPLITMIX_GAMMA;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// Launch: any 1-D grid; threads stride over the n elements.
template <typename IN, typename OUT>
__device__ __forceinline__ void lora_dropout(const IN* __restrict__ x, OUT* __restrict__ y, u64 n,
                                             u64 state, float p, float keep) {
    const u64 stride = static_cast<u64>(gridDim.x) * blockDim.x;
    for (u64 i = static_cast<u64>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float u = __fmul_rn(static_cast<float>(splitmix_draw(state, i + 1) >> 40), 5.9604644775390625e-8f);
        y[i] = from_f32<OUT>(__fmul_rn(to_f32(x[i]), u < p ? 0.0f : keep));
    }
}

extern "C" __global__ void kLoraDropout_f32_f32(const float* __restrict__ x, float* __restrict__ y, u64 n,
                                             u64 state, float p, float keep) {
    lora_dropout<float, float>(x, y, n, state, p, keep);
}

extern "C" __global__ void kLoraDropout_bf16_f32(const __nv_bfloat16* __restrict__ x, float* __restrict__ y, u64 n,
                                             u64 state, float p, float keep) {
    lora_dropout<__nv_bfloat16, float>(x, y, n, state, p, keep);
}

extern "C" __global__ void kLoraDropout_f16_f32(const __half* __restrict__ x, float* __restrict__ y, u64 n,
                                             u64 state, float p, float keep) {
    lora_dropout<__half, float>(x, y, n, state, p, keep);
}

extern "C" __global__ void kLoraDropout_f32_bf16(const float* __restrict__ x, __nv_bfloat16* __restrict__ y, u64 n,
                                             u64 state, float p, float keep) {
    lora_dropout<float, __nv_bfloat16>(x, y, n, state, p, keep);
}

extern "C" __global__ void kLoraDropout_f32_f16(const float* __restrict__ x, __half* __restrict__ y, u64 n,
                                             u64 state, float p, float keep) {
    lora_dropout<float, __half>(x, y, n, state, p, keep);
}
