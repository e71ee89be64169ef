// AdamW steps of rupantor's paged optimizers (crates/train/src/optim), bit-exact twins of the
// CPU kernels in crates/train/src/optim/kernels.rs:
//
//   kAdamW8bitBlockwise  bitsandbytes 0.50 AdamW8bit (CPU `_optimizer_update_8bit_blockwise`):
//                        blockwise-256 8-bit moments, dequantize -> Adam -> re-quantize with
//                        bitsandbytes' CPU quantizer (table-based code search).
//   kAdam32Bnb           bitsandbytes' 32-bit Adam (f32 moments of tensors under min_8bit_size).
//   kAdamW32Torch        torch.optim.AdamW, single-tensor path (the f32 optimizer).
//
// Each launch updates one extent: a contiguous run of one tensor's elements whose state sits in
// a page staged in device memory (crates/train/src/optim/paged.rs):
//
//   8-bit page (page_blocks slots of 256):  codes1[page_blocks*256] codes2[page_blocks*256]
//                                            absmax1[page_blocks] absmax2[page_blocks] (f32)
//   f32 page (page_elems slots):             m[page_elems] v[page_elems]
//
// `slot` is the extent's first element slot in its page (a multiple of 256 in 8-bit pages) and
// `n` its length; p and g point at the extent's first parameter and gradient element.
//
// Exactness: the CPU rounds every operation once and fuses exactly where torch / bitsandbytes
// fuse (explicit mul_add), and takes IEEE square roots. Here every operation is the matching
// round-to-nearest intrinsic (__fmul_rn, __fadd_rn, __fsub_rn, __fdiv_rn, __fsqrt_rn,
// __fmaf_rn) and the module is compiled with -fmad=false -ftz=false -prec-div=true
// -prec-sqrt=true, so moments, codes, absmax and parameters are bit-identical to the CPU's.

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

#define BLOCK 256   // elements per quantization block = threads per thread block
#define WARPS (BLOCK / 32)
#define MAP 256     // entries of a dynamic map

// bitsandbytes' CPU code search (rupantor_quant::blockwise8::CodeLut::code_of): the scaled value
// is clamped to [-1, 1] and rounded to one of 65536 grid points (NaN -> grid 0); the code of grid
// point c is the table entry, here the largest q with starts[q] <= c (starts is non-decreasing
// with starts[0] == 0, built by kernels.rs `code_starts` from the same table).
__device__ __forceinline__ u8 code_of(const u32* starts, float scaled) {
    u32 grid = 0;
    if (!(scaled != scaled)) {
        float v = scaled;
        if (v < -1.0f) v = -1.0f;
        if (v > 1.0f) v = 1.0f;
        float x = __fmaf_rn(65535.0f, __fmul_rn(__fadd_rn(v, 1.0f), 0.5f), 0.5f);
        grid = (u32)__float2int_rz(x) & 0xffffu;
    }
    u32 q = 0;
#pragma unroll
    for (u32 step = MAP / 2; step > 0; step >>= 1) {
        if (starts[q + step] <= grid) q += step;
    }
    return (u8)q;
}

// CodeLut::quantize_block for one element, given its block's absmax.
__device__ __forceinline__ u8 quantize(const u32* starts, float x, float absmax) {
    if (absmax == 0.0f) return 0;
    float inv = __fdiv_rn(1.0f, absmax);
    return code_of(starts, __fmul_rn(x, inv));
}

// The block-wide maximum of a and b (each >= 0 or NaN; fmaxf drops NaN as the CPU fold does).
__device__ __forceinline__ float2 block_max2(float a, float b, float2* red) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
        b = fmaxf(b, __shfl_xor_sync(0xffffffffu, b, o));
    }
    if (lane == 0) red[warp] = make_float2(a, b);
    __syncthreads();
    if (warp == 0) {
        float2 r = lane < WARPS ? red[lane] : make_float2(0.0f, 0.0f);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            r.x = fmaxf(r.x, __shfl_xor_sync(0xffffffffu, r.x, o));
            r.y = fmaxf(r.y, __shfl_xor_sync(0xffffffffu, r.y, o));
        }
        if (lane == 0) red[0] = r;
    }
    __syncthreads();
    return red[0];
}

// One thread block per 256-element block of the extent; Bnb8Step::apply_block per element.
// maps = [signed map (m) | unsigned map (v)], starts = [starts of map1 | starts of map2].
extern "C" __global__ void __launch_bounds__(BLOCK) kAdamW8bitBlockwise(
    float* __restrict__ p, const float* __restrict__ g, u8* __restrict__ page, u64 page_blocks,
    u64 slot, u64 n, const float* __restrict__ maps, const u32* __restrict__ starts, float beta1,
    float one_minus_beta1, float beta2, float one_minus_beta2, float correction2, float eps,
    int has_decay, float decay, float neg_lr_over_c1) {
    __shared__ float s_map[2 * MAP];
    __shared__ u32 s_starts[2 * MAP];
    __shared__ float2 s_red[WARPS];
    const u32 t = threadIdx.x;
    s_map[t] = maps[t];
    s_map[MAP + t] = maps[MAP + t];
    s_starts[t] = starts[t];
    s_starts[MAP + t] = starts[MAP + t];
    __syncthreads();

    const u64 cap = page_blocks * BLOCK;
    u8* codes1 = page + slot;
    u8* codes2 = page + cap + slot;
    float* absmax1 = reinterpret_cast<float*>(page + 2 * cap) + slot / BLOCK;
    float* absmax2 = absmax1 + page_blocks;

    const u64 b = blockIdx.x;
    const u64 i = b * BLOCK + t;
    const bool live = i < n;
    const float a1 = absmax1[b], a2 = absmax2[b];
    float m = 0.0f, v = 0.0f;
    if (live) {
        const float gi = g[i];
        const float m_old = __fmul_rn(s_map[codes1[i]], a1);
        const float v_old = __fmul_rn(s_map[MAP + codes2[i]], a2);
        m = __fmaf_rn(gi, one_minus_beta1, __fmul_rn(m_old, beta1));
        v = __fmaf_rn(__fmul_rn(one_minus_beta2, gi), gi, __fmul_rn(v_old, beta2));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), correction2), eps);
        const float pi = has_decay ? __fmul_rn(p[i], decay) : p[i];
        p[i] = __fadd_rn(pi, __fdiv_rn(__fmul_rn(neg_lr_over_c1, m), denom));
    }
    // Every thread has read the old absmax before the reduction's barrier; thread 0 overwrites
    // it only after.
    const float2 am = block_max2(live ? fabsf(m) : 0.0f, live ? fabsf(v) : 0.0f, s_red);
    if (live) {
        codes1[i] = quantize(s_starts, m, am.x);
        codes2[i] = quantize(s_starts + MAP, v, am.y);
    }
    if (t == 0) {
        absmax1[b] = am.x;
        absmax2[b] = am.y;
    }
}

// Bnb32Step::apply per element. page = [m (page_elems) | v (page_elems)].
extern "C" __global__ void __launch_bounds__(BLOCK) kAdam32Bnb(
    float* __restrict__ p, const float* __restrict__ g, float* __restrict__ page, u64 page_elems,
    u64 slot, u64 n, float beta1, float one_minus_beta1, float beta2, float one_minus_beta2,
    int has_decay, float decay, float eps_c2, float step_size) {
    const u64 i = (u64)blockIdx.x * BLOCK + threadIdx.x;
    if (i >= n) return;
    float* m = page + slot;
    float* v = page + page_elems + slot;
    const float gi = g[i];
    const float mi = __fmaf_rn(gi, one_minus_beta1, __fmul_rn(m[i], beta1));
    const float vi = __fmaf_rn(__fmul_rn(one_minus_beta2, gi), gi, __fmul_rn(v[i], beta2));
    const float pi = has_decay ? __fmul_rn(p[i], decay) : p[i];
    const float update = __fdiv_rn(mi, __fadd_rn(__fsqrt_rn(vi), eps_c2));
    p[i] = __fmaf_rn(update, step_size, pi);
    m[i] = mi;
    v[i] = vi;
}

// TorchStep::apply per element. lerp_from_end selects at::lerp's second form (|w| >= 0.5), with
// lerp_weight = w - 1 there and w otherwise (both rounded on the host as the CPU rounds them).
extern "C" __global__ void __launch_bounds__(BLOCK) kAdamW32Torch(
    float* __restrict__ p, const float* __restrict__ g, float* __restrict__ page, u64 page_elems,
    u64 slot, u64 n, int has_decay, float decay, int lerp_from_end, float lerp_weight,
    float beta2, float one_minus_beta2, float bias_correction2_sqrt, float eps,
    float neg_step_size) {
    const u64 i = (u64)blockIdx.x * BLOCK + threadIdx.x;
    if (i >= n) return;
    float* m = page + slot;
    float* v = page + page_elems + slot;
    const float gi = g[i];
    const float mo = m[i];
    const float pi = has_decay ? __fmul_rn(p[i], decay) : p[i];
    const float diff = __fsub_rn(gi, mo);
    const float mi = lerp_from_end ? __fmaf_rn(lerp_weight, diff, gi)
                                   : __fmaf_rn(lerp_weight, diff, mo);
    const float vi = __fmaf_rn(__fmul_rn(one_minus_beta2, gi), gi, __fmul_rn(v[i], beta2));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bias_correction2_sqrt), eps);
    p[i] = __fadd_rn(pi, __fdiv_rn(__fmul_rn(neg_step_size, mi), denom));
    m[i] = mi;
    v[i] = vi;
}
