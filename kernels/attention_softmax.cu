// Attention probabilities, forward and backward, one pass per row
// (crates/model/src/ops/attention_softmax.rs): the GPU twins of `probs_row` and `grad_row`
// there. For a row s of k scores (f32, bf16 or f16, widened to f32 exactly), its f32 mask row m,
// the scale a and the softcap c (c == 0: none; inv_c = f32(1 / c)):
//
//   x_j   = tanh((s_j * a) * inv_c) * c + m_j          (s_j * a + m_j without a softcap)
//   p_j   = exp(x_j - max x) / sum_j exp(x_j - max x)  (rounded once to the scores' type)
//   ds_j  = p_j * (g_j - sum_j g_j * p_j) * (1 - t_j^2) * a,  t_j = tanh((s_j * a) * inv_c)
//
// with g the upstream gradient and ds returned in the scores' type (no (1 - t^2) factor without
// a softcap). Every step is an explicit round-to-nearest intrinsic in the CPU's order (and the
// module is built with -fmad=false); only the row sums differ from the CPU (a tree of f32
// partial sums here, f64 there), and the last bits of tanhf / expf. A row whose every logit is
// -inf (a -inf mask) comes out uniform, 1 / k, as an f32::MIN-masked row does by itself.
//
// Launch geometry: one block per row (a grid-stride loop over rows past the grid's size),
// blockDim.x a multiple of 32 up to 1024, each thread taking keys j = tid, tid + blockDim.x, ...
// The forward's dynamic shared memory, when `cached`, holds the row's k logits and then their
// exponentials between its three passes (each thread reads back only the slots it wrote, so no
// barrier guards them); without it (long rows) each pass recomputes them from global memory.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define ATTN_THREADS 1024

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// The max of v over the block, the same value in every thread. Every thread of the block must
// call it; it ends with a barrier, so the scratch is free for the next reduction.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    const int warps = blockDim.x / 32;
    if (warps == 1) return v;
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    float m = scratch[0];
    for (int w = 1; w < warps; ++w) m = fmaxf(m, scratch[w]);
    __syncthreads();
    return m;
}

// The sum of v over the block, the same value in every thread: the xor butterfly leaves equal
// sums in all lanes, then every thread adds the warp totals in the same fixed order, so the
// result is deterministic for a given block size. Same calling rules as block_max.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    for (int off = 16; off > 0; off >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, off));
    const int warps = blockDim.x / 32;
    if (warps == 1) return v;
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total = __fadd_rn(total, scratch[w]);
    __syncthreads();
    return total;
}

// The scaled, capped score of s (before the mask), as `Params::capped` on the CPU.
__device__ __forceinline__ float capped(float s, float scale, float cap, float inv_cap) {
    const float x = __fmul_rn(s, scale);
    return cap > 0.0f ? __fmul_rn(tanhf(__fmul_rn(x, inv_cap)), cap) : x;
}

template <typename T>
__device__ __forceinline__ void attn_probs(const T* __restrict__ s, const float* __restrict__ mask,
                                           T* __restrict__ p, unsigned int rows, unsigned int k,
                                           unsigned int queries, unsigned int heads,
                                           unsigned int mask_batched, float scale, float cap,
                                           float inv_cap, unsigned int cached) {
    extern __shared__ float cache[];
    __shared__ float scratch[32];
    const long long per_batch = static_cast<long long>(heads) * queries;
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const long long query = row % queries;
        const long long mask_row = mask_batched ? (row / per_batch) * queries + query : query;
        const T* sr = s + row * k;
        const float* mr = mask + mask_row * k;
        T* pr = p + row * k;

        float mx = -INFINITY;
        for (unsigned int j = threadIdx.x; j < k; j += blockDim.x) {
            const float x = __fadd_rn(capped(to_f32(sr[j]), scale, cap, inv_cap), mr[j]);
            if (cached) cache[j] = x;
            mx = fmaxf(mx, x);
        }
        mx = block_max(mx, scratch);

        if (mx == -INFINITY) {
            // Every logit is -inf (or NaN, which stays NaN): exp(x - max) would be NaN.
            const float uniform = __fdiv_rn(1.0f, static_cast<float>(k));
            for (unsigned int j = threadIdx.x; j < k; j += blockDim.x) {
                const float x = cached ? cache[j]
                                       : __fadd_rn(capped(to_f32(sr[j]), scale, cap, inv_cap), mr[j]);
                pr[j] = from_f32<T>(isnan(x) ? x : uniform);
            }
            continue;
        }

        float sum = 0.0f;
        for (unsigned int j = threadIdx.x; j < k; j += blockDim.x) {
            const float x = cached ? cache[j]
                                   : __fadd_rn(capped(to_f32(sr[j]), scale, cap, inv_cap), mr[j]);
            const float e = expf(__fsub_rn(x, mx));
            if (cached) cache[j] = e;
            sum = __fadd_rn(sum, e);
        }
        sum = block_sum(sum, scratch);

        for (unsigned int j = threadIdx.x; j < k; j += blockDim.x) {
            const float e =
                cached ? cache[j]
                       : expf(__fsub_rn(__fadd_rn(capped(to_f32(sr[j]), scale, cap, inv_cap), mr[j]), mx));
            pr[j] = from_f32<T>(__fdiv_rn(e, sum));
        }
    }
}

template <typename T>
__device__ __forceinline__ void attn_probs_bwd(const T* __restrict__ s, const T* __restrict__ p,
                                               const T* __restrict__ g, T* __restrict__ ds,
                                               unsigned int rows, unsigned int k, float scale,
                                               float cap, float inv_cap) {
    __shared__ float scratch[32];
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const long long base = row * k;
        float dot = 0.0f;
        for (unsigned int j = threadIdx.x; j < k; j += blockDim.x)
            dot = __fadd_rn(dot, __fmul_rn(to_f32(g[base + j]), to_f32(p[base + j])));
        dot = block_sum(dot, scratch);

        for (unsigned int j = threadIdx.x; j < k; j += blockDim.x) {
            float d = __fmul_rn(to_f32(p[base + j]), __fsub_rn(to_f32(g[base + j]), dot));
            if (cap > 0.0f) {
                const float t = tanhf(__fmul_rn(__fmul_rn(to_f32(s[base + j]), scale), inv_cap));
                d = __fmul_rn(d, __fsub_rn(1.0f, __fmul_rn(t, t)));
            }
            ds[base + j] = from_f32<T>(__fmul_rn(d, scale));
        }
    }
}

// The entry points are declared in full below, not by a macro, so that
// crates/quant/tests/ptx_modules.rs finds each one's name in this source.
#define PROBS_ARGS(T)                                                                             \
    const T *__restrict__ s, const float *__restrict__ mask, T *__restrict__ p, unsigned int rows, \
        unsigned int k, unsigned int queries, unsigned int heads, unsigned int mask_batched,       \
        float scale, float cap, float inv_cap, unsigned int cached
#define PROBS_PASS s, mask, p, rows, k, queries, heads, mask_batched, scale, cap, inv_cap, cached
#define BWD_ARGS(T)                                                                               \
    const T *__restrict__ s, const T *__restrict__ p, const T *__restrict__ g, T *__restrict__ ds, \
        unsigned int rows, unsigned int k, float scale, float cap, float inv_cap
#define BWD_PASS s, p, g, ds, rows, k, scale, cap, inv_cap

// Launch: gridDim.x = min(rows, 2^31 - 1), blockDim.x = a multiple of 32 up to ATTN_THREADS,
// dynamic shared memory k * 4 bytes when `cached` (else 0).
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) kAttnProbs_f32(PROBS_ARGS(float)) {
    attn_probs<float>(PROBS_PASS);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) kAttnProbs_bf16(PROBS_ARGS(__nv_bfloat16)) {
    attn_probs<__nv_bfloat16>(PROBS_PASS);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) kAttnProbs_f16(PROBS_ARGS(__half)) {
    attn_probs<__half>(PROBS_PASS);
}

// Launch: gridDim.x = min(rows, 2^31 - 1), blockDim.x = a multiple of 32 up to ATTN_THREADS.
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) kAttnProbsBwd_f32(BWD_ARGS(float)) {
    attn_probs_bwd<float>(BWD_PASS);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) kAttnProbsBwd_bf16(BWD_ARGS(__nv_bfloat16)) {
    attn_probs_bwd<__nv_bfloat16>(BWD_PASS);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) kAttnProbsBwd_f16(BWD_ARGS(__half)) {
    attn_probs_bwd<__half>(BWD_PASS);
}
