// Fused rotary embedding (crates/model/src/ops/rope.rs): the GPU twin of the CPU loop there.
// For x [b, h, s, d] and cos / sin tables (C, S below) of d values per (batch row, position),
// with half = d / 2 and j = i + half, pair i (0 <= i < half) of a row maps
//
//   forward:   y[i] = x[i] C[i] - x[j] S[i]     y[j] = x[j] C[j] + x[i] S[j]
//   backward: dx[i] = g[i] C[i] + g[j] S[j]    dx[j] = g[j] C[j] - g[i] S[i]
//
// which is `x * cos + rotate_half(x) * sin` (and its transpose), one pass instead of candle's
// narrow / neg / cat / broadcast_mul / add chain. Each product and sum is rounded in f32 exactly
// as the CPU does it (explicit `__fmul_rn` / `__fadd_rn` / `__fsub_rn`, never contracted, and the
// module is built with -fmad=false), then rounded once to x's dtype (RNE), so the GPU output is
// bit-identical to the CPU's.
//
// x is read through its strides (batch, head, position; the last dim is contiguous), so q and k
// arrive as the transposed views of the projections' output and leave contiguous: the rotation
// and the transpose's copy are one kernel. The output and the tables are contiguous; a table
// serves every batch row (`table_rows_per_batch` = 0) or has `s` rows per batch row.
//
// Launch: blockDim = (bx, by) with bx a multiple of 32 (lanes over the pairs of a row, looping
// when half > bx) and by rows per block; any 1-D grid, blocks stride over the rows. rows, seq,
// heads and half fit in 32 bits (checked by the launcher), so the row's coordinates take 32-bit
// divisions; offsets are 64-bit.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned long long u64;

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T narrow(float v);
template <> __device__ __forceinline__ float narrow<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half narrow<__half>(float v) { return __float2half_rn(v); }

template <typename X, typename T, bool BWD>
__device__ __forceinline__ void rope_rows(const X* __restrict__ x, const T* __restrict__ cos_table,
                                          const T* __restrict__ sin_table, X* __restrict__ y,
                                          unsigned rows, unsigned half, unsigned seq, unsigned heads,
                                          u64 stride_b, u64 stride_h, u64 stride_s,
                                          unsigned table_rows_per_batch) {
    const u64 d = 2ull * half;
    const u64 step = static_cast<u64>(gridDim.x) * blockDim.y;
    for (u64 r = static_cast<u64>(blockIdx.x) * blockDim.y + threadIdx.y; r < rows; r += step) {
        const unsigned row = static_cast<unsigned>(r);
        const unsigned pos = row % seq;
        const unsigned bh = row / seq;
        const unsigned head = bh % heads;
        const unsigned batch = bh / heads;
        const X* xr = x + batch * stride_b + head * stride_h + pos * stride_s;
        const u64 t = (static_cast<u64>(batch) * table_rows_per_batch + pos) * d;
        const T* cr = cos_table + t;
        const T* sr = sin_table + t;
        X* yr = y + r * d;
        for (unsigned i = threadIdx.x; i < half; i += blockDim.x) {
            const float a1 = widen(xr[i]), a2 = widen(xr[i + half]);
            const float c1 = widen(cr[i]), c2 = widen(cr[i + half]);
            const float s1 = widen(sr[i]), s2 = widen(sr[i + half]);
            float y1, y2;
            if (BWD) {
                y1 = __fadd_rn(__fmul_rn(a1, c1), __fmul_rn(a2, s2));
                y2 = __fsub_rn(__fmul_rn(a2, c2), __fmul_rn(a1, s1));
            } else {
                y1 = __fsub_rn(__fmul_rn(a1, c1), __fmul_rn(a2, s1));
                y2 = __fadd_rn(__fmul_rn(a2, c2), __fmul_rn(a1, s2));
            }
            yr[i] = narrow<X>(y1);
            yr[i + half] = narrow<X>(y2);
        }
    }
}

// Entry points: kRope{,Bwd}_<x dtype>_<table dtype>, all with the same arguments
// (const X* x, const T* cos_table, const T* sin_table, X* y, unsigned rows, unsigned half,
//  unsigned seq, unsigned heads, u64 stride_b, u64 stride_h, u64 stride_s,
//  unsigned table_rows_per_batch).

#define ROPE_ARGS(X, T)                                                                          \
    const X* __restrict__ x, const T* __restrict__ cos_table, const T* __restrict__ sin_table,  \
        X* __restrict__ y, unsigned rows, unsigned half, unsigned seq, unsigned heads,           \
        u64 stride_b, u64 stride_h, u64 stride_s, unsigned table_rows_per_batch
#define ROPE_PASS                                                                                \
    x, cos_table, sin_table, y, rows, half, seq, heads, stride_b, stride_h, stride_s,            \
        table_rows_per_batch

extern "C" __global__ void kRope_f32_f32(ROPE_ARGS(float, float)) {
    rope_rows<float, float, false>(ROPE_PASS);
}
extern "C" __global__ void kRope_bf16_bf16(ROPE_ARGS(__nv_bfloat16, __nv_bfloat16)) {
    rope_rows<__nv_bfloat16, __nv_bfloat16, false>(ROPE_PASS);
}
extern "C" __global__ void kRope_bf16_f32(ROPE_ARGS(__nv_bfloat16, float)) {
    rope_rows<__nv_bfloat16, float, false>(ROPE_PASS);
}
extern "C" __global__ void kRope_f16_f16(ROPE_ARGS(__half, __half)) {
    rope_rows<__half, __half, false>(ROPE_PASS);
}
extern "C" __global__ void kRope_f16_f32(ROPE_ARGS(__half, float)) {
    rope_rows<__half, float, false>(ROPE_PASS);
}

extern "C" __global__ void kRopeBwd_f32_f32(ROPE_ARGS(float, float)) {
    rope_rows<float, float, true>(ROPE_PASS);
}
extern "C" __global__ void kRopeBwd_bf16_bf16(ROPE_ARGS(__nv_bfloat16, __nv_bfloat16)) {
    rope_rows<__nv_bfloat16, __nv_bfloat16, true>(ROPE_PASS);
}
extern "C" __global__ void kRopeBwd_bf16_f32(ROPE_ARGS(__nv_bfloat16, float)) {
    rope_rows<__nv_bfloat16, float, true>(ROPE_PASS);
}
extern "C" __global__ void kRopeBwd_f16_f16(ROPE_ARGS(__half, __half)) {
    rope_rows<__half, __half, true>(ROPE_PASS);
}
extern "C" __global__ void kRopeBwd_f16_f32(ROPE_ARGS(__half, float)) {
    rope_rows<__half, float, true>(ROPE_PASS);
}
