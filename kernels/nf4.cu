// NF4 (bitsandbytes layout, double-quantized absmax) kernels. crates/quant/build.rs compiles
// this file to PTX with nvcc (-fmad=false -ftz=false); kernels/README.md explains the design.
//
// Layout (see crates/quant/src/nf4.rs):
//   packed[ceil(n / 2)]      two 4-bit codes per byte, FIRST element in the HIGH nibble
//   absmax_codes[ceil(n/64)] 8-bit codes of (absmax - offset) against nested_map
//   nested_absmax[ceil(n/64/256)] f32 scale per 256 absmax codes
//   nested_map[256]          bitsandbytes' signed dynamic map
//   offset                   mean of the raw absmax values
//
//   absmax[b] = fadd_rn(fmul_rn(nested_map[absmax_codes[b]], nested_absmax[b / 256]), offset)
//   out[i]    = fmul_rn(NF4[q_i], absmax[i / 64])   (then RNE to bf16 / f16, or kept as f32)
//
// Every product and sum is an explicit round-to-nearest intrinsic and the module is compiled
// with -fmad=false, so no multiply-add is contracted into an FMA: the results are bit-identical
// to the CPU codec (`Nf4Tensor::dequantize*`), which performs the same two roundings per absmax
// and one per element.
//
// Every kernel takes `packed` as the start of its own allocation (an `Nf4Device` array), so it
// is 256-byte aligned; the output and `x` may sit anywhere and are checked on the device.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NF4_BLOCK 64        // elements per absmax
#define NESTED_BLOCK 256    // absmax codes per nested scale

// bitsandbytes' NF4 table (index 0 = -1, 7 = 0, 15 = 1); identical bits to rupantor_quant::NF4_CODE
// (checked by crates/quant/tests/ptx_modules.rs against the PTX initializer).
extern "C" __constant__ float kNf4Code[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

// Loads of the packed weights, which every kernel reads exactly once: read-only path, no L1
// allocation (so they do not evict x or the absmax codes, which are reused), and a 256-byte L2
// prefetch, since the neighbouring bytes are the next ones asked for. Plain asm (not volatile):
// the data never changes during a kernel, so the compiler may schedule these freely.
__device__ __forceinline__ uint4 ld_stream_u128(const void* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

__device__ __forceinline__ u32 ld_stream_u32(const void* p) {
    u32 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ u32 ld_stream_u16(const void* p) {
    u16 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}

// Predicated forms for the GEMV's loads: with !ok nothing is read and the destination keeps
// the value it had.
__device__ __forceinline__ void ld_stream_u128_if(uint4& v, const void* p, bool ok) {
    asm("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %5, 0;\n\t"
        "@p ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n\t}"
        : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
        : "l"(p), "r"(static_cast<u32>(ok)));
}

__device__ __forceinline__ u32 ld_u8_if(const u8* p, bool ok) {
    u32 v = 0;
    asm("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %2, 0;\n\t@p ld.global.nc.u8 %0, [%1];\n\t}"
        : "+r"(v)
        : "l"(p), "r"(static_cast<u32>(ok)));
    return v;
}

__device__ __forceinline__ float ld_f32_if(const float* p, bool ok) {
    float v = 0.0f;
    asm("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %2, 0;\n\t@p ld.global.nc.f32 %0, [%1];\n\t}"
        : "+f"(v)
        : "l"(p), "r"(static_cast<u32>(ok)));
    return v;
}

// The CPU's absmax: two roundings, never contracted.
__device__ __forceinline__ float nf4_scale(const float* map, u32 code, float nested, float offset) {
    return __fadd_rn(__fmul_rn(map[code], nested), offset);
}

// Double-quant step straight from global memory: the absmax of 64-element block `b`.
__device__ __forceinline__ float nf4_block_absmax(const u8* __restrict__ absmax_codes,
                                                  const float* __restrict__ nested_absmax,
                                                  const float* __restrict__ nested_map,
                                                  float offset, u64 b) {
    const float code = __ldg(nested_map + __ldg(absmax_codes + b));
    const float scale = __ldg(nested_absmax + b / NESTED_BLOCK);
    return __fadd_rn(__fmul_rn(code, scale), offset);
}

// Element e of the tensor, from byte loads (the tails and the unaligned paths).
__device__ __forceinline__ float nf4_element(const u8* __restrict__ packed,
                                             const u8* __restrict__ absmax_codes,
                                             const float* __restrict__ nested_absmax,
                                             const float* map, float offset, const float* lut,
                                             u64 e) {
    const u32 byte = __ldg(packed + e / 2);
    const u32 q = (e & 1) ? (byte & 0xfu) : (byte >> 4);
    const u64 b = e / NF4_BLOCK;
    const float s = nf4_scale(map, __ldg(absmax_codes + b), __ldg(nested_absmax + b / NESTED_BLOCK),
                              offset);
    return __fmul_rn(lut[q], s);
}

__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    return static_cast<u32>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           (static_cast<u32>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
    return static_cast<u32>(__half_as_ushort(__float2half_rn(lo))) |
           (static_cast<u32>(__half_as_ushort(__float2half_rn(hi))) << 16);
}

__device__ __forceinline__ void store_one(float* out, u64 e, float v) { out[e] = v; }
__device__ __forceinline__ void store_one(__nv_bfloat16* out, u64 e, float v) {
    out[e] = __float2bfloat16_rn(v);
}
__device__ __forceinline__ void store_one(__half* out, u64 e, float v) { out[e] = __float2half_rn(v); }

// ---------------------------------------------------------------------------------------------
// Dequantization: kDequantizeNF4_{f32,bf16,f16}
//
// Launch: blockDim = DQ_THREADS, gridDim = min(ceil(chunks / (DQ_THREADS * DQ_UNROLL)), the
// blocks the device holds at once) (Nf4Cuda::dequant_launch_config); a grid-stride loop covers
// the rest. A chunk is the elements of one 16-byte store: 4 for f32 (2 packed bytes), 8 for
// bf16 / f16 (4 packed bytes). Consecutive threads take consecutive chunks, so a warp's loads
// (64 or 128 bytes) and stores (512 bytes) are contiguous. Each thread issues the loads of
// DQ_UNROLL chunks (packed bytes, absmax code, nested scale) before it expands the first, and
// decodes each chunk's absmax itself (map in shared memory), so no block-wide barrier sits
// between a load and its use.
// ---------------------------------------------------------------------------------------------

#define DQ_THREADS 256
#define DQ_UNROLL 8

template <typename T> struct DqChunk;
template <> struct DqChunk<float> { static constexpr int kElems = 4; };
template <> struct DqChunk<__nv_bfloat16> { static constexpr int kElems = 8; };
template <> struct DqChunk<__half> { static constexpr int kElems = 8; };

__device__ __forceinline__ void store_chunk(float* out, u64 e, const float* v) {
    *reinterpret_cast<float4*>(out + e) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store_chunk(__nv_bfloat16* out, u64 e, const float* v) {
    *reinterpret_cast<uint4*>(out + e) = make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]),
                                                    pack_bf16x2(v[4], v[5]), pack_bf16x2(v[6], v[7]));
}
__device__ __forceinline__ void store_chunk(__half* out, u64 e, const float* v) {
    *reinterpret_cast<uint4*>(out + e) = make_uint4(pack_f16x2(v[0], v[1]), pack_f16x2(v[2], v[3]),
                                                    pack_f16x2(v[4], v[5]), pack_f16x2(v[6], v[7]));
}

template <typename T>
__device__ __forceinline__ void dequantize_nf4(const u8* __restrict__ packed,
                                               const u8* __restrict__ absmax_codes,
                                               const float* __restrict__ nested_absmax,
                                               const float* __restrict__ nested_map, float offset,
                                               T* __restrict__ out, u64 n) {
    constexpr int E = DqChunk<T>::kElems;
    // Sixteen distinct floats in sixteen banks: lookups with divergent indices never conflict
    // (constant memory would serialise them).
    __shared__ float lut[16];
    __shared__ float map[256];
    if (threadIdx.x < 16) lut[threadIdx.x] = kNf4Code[threadIdx.x];
    for (u32 i = threadIdx.x; i < 256; i += DQ_THREADS) map[i] = __ldg(nested_map + i);
    __syncthreads();

    const u64 first = static_cast<u64>(blockIdx.x) * DQ_THREADS + threadIdx.x;
    const u64 stride = static_cast<u64>(gridDim.x) * DQ_THREADS;
    const bool vec = (reinterpret_cast<size_t>(out) & 15) == 0;
    if (!vec) {
        for (u64 e = first; e < n; e += stride) {
            store_one(out, e, nf4_element(packed, absmax_codes, nested_absmax, map, offset, lut, e));
        }
        return;
    }

    const u64 chunks = n / E;  // whole chunks; the last n % E elements are the tail below
    for (u64 c0 = first; c0 < chunks; c0 += DQ_UNROLL * stride) {
        u32 word[DQ_UNROLL];
        u32 code[DQ_UNROLL];
        float nested[DQ_UNROLL];
#pragma unroll
        for (int k = 0; k < DQ_UNROLL; ++k) {
            const u64 c = c0 + k * stride;
            word[k] = 0;
            code[k] = 0;
            nested[k] = 0.0f;
            if (c < chunks) {
                word[k] = E == 4 ? ld_stream_u16(packed + 2 * c) : ld_stream_u32(packed + 4 * c);
                const u64 b = c * E / NF4_BLOCK;
                code[k] = __ldg(absmax_codes + b);
                nested[k] = __ldg(nested_absmax + b / NESTED_BLOCK);
            }
        }
#pragma unroll
        for (int k = 0; k < DQ_UNROLL; ++k) {
            const u64 c = c0 + k * stride;
            if (c < chunks) {
                const float s = nf4_scale(map, code[k], nested[k], offset);
                float v[E];
                // Byte j of the chunk holds element 2j (high nibble) and 2j + 1 (low nibble).
#pragma unroll
                for (int j = 0; j < E / 2; ++j) {
                    v[2 * j] = __fmul_rn(lut[(word[k] >> (8 * j + 4)) & 0xfu], s);
                    v[2 * j + 1] = __fmul_rn(lut[(word[k] >> (8 * j)) & 0xfu], s);
                }
                store_chunk(out, c * E, v);
            }
        }
    }
    if (first == 0) {
        for (u64 e = chunks * E; e < n; ++e) {
            store_one(out, e, nf4_element(packed, absmax_codes, nested_absmax, map, offset, lut, e));
        }
    }
}

extern "C" __global__ void __launch_bounds__(DQ_THREADS)
kDequantizeNF4_f32(const u8* __restrict__ packed, const u8* __restrict__ absmax_codes,
                   const float* __restrict__ nested_absmax, const float* __restrict__ nested_map,
                   float offset, float* __restrict__ out, u64 n) {
    dequantize_nf4<float>(packed, absmax_codes, nested_absmax, nested_map, offset, out, n);
}

extern "C" __global__ void __launch_bounds__(DQ_THREADS)
kDequantizeNF4_bf16(const u8* __restrict__ packed, const u8* __restrict__ absmax_codes,
                    const float* __restrict__ nested_absmax, const float* __restrict__ nested_map,
                    float offset, __nv_bfloat16* __restrict__ out, u64 n) {
    dequantize_nf4<__nv_bfloat16>(packed, absmax_codes, nested_absmax, nested_map, offset, out, n);
}

extern "C" __global__ void __launch_bounds__(DQ_THREADS)
kDequantizeNF4_f16(const u8* __restrict__ packed, const u8* __restrict__ absmax_codes,
                   const float* __restrict__ nested_absmax, const float* __restrict__ nested_map,
                   float offset, __half* __restrict__ out, u64 n) {
    dequantize_nf4<__half>(packed, absmax_codes, nested_absmax, nested_map, offset, out, n);
}

// ---------------------------------------------------------------------------------------------
// Fused NF4 x bf16 GEMV for decoding, rows of 32k elements: kGemvNF4_bf16_t{1,2,4,8}
//
//   y[b, o] = sum_i x[b, i] * W[o, i]      W: [out_features, in_features] NF4 (row-major)
//
// The work unit is GEMV_ROWS consecutive rows of W; a lane group of G = 2^g_log2 lanes
// (8..256, chosen by the launcher, Nf4Cuda::gemv_plan) owns a unit. Lane l of a group takes the
// 16-byte items j = l, l + G, l + 2G, ... (32 elements each, always inside one 64-element absmax
// block because rows are multiples of 32) of all GEMV_ROWS rows at once, so every x value it
// loads serves GEMV_ROWS rows and a row segment of G * 16 contiguous bytes is read per step.
// The loads of the next step (GEMV_ROWS items, their absmax codes and nested scales) are issued
// before the current step is multiplied (kPrefetch, tiles 1 and 2). Units are dealt out so that each thread
// block, and so each SM, gets an equal share: unit = blockIdx.x + gridDim.x * (round * groups + g).
//
// Decoding: a 256-entry table in shared memory maps a packed byte to its two codes (float2),
// stored 16 times so that lane l of each half-warp reads copy l: every lookup is conflict-free
// whatever the bytes are (the 4 B per element it returns are the kernel's main shared-memory
// traffic). x is read with 16-byte read-only loads (it stays in L1; the streamed weights are
// not allocated there) and widened to f32 exactly.
//
// Arithmetic: f32 with explicit FMAs, a warp-shuffle tree (and, for G > 32, a fixed-order sum
// over the group's warps through shared memory), one RNE rounding to bf16. With kFactor
// (tiles 1, 2 and 4) an item's 32 products x * code are summed first and multiplied by the
// block's absmax once; otherwise each weight is the exact f32 value kDequantizeNF4_f32 produces.
// Batches are processed BT rows at a time; batch <= BT reads W once.
// ---------------------------------------------------------------------------------------------

#define GEMV_THREADS 256
#define GEMV_WARPS (GEMV_THREADS / 32)
#define GEMV_ROWS 4
#define GEMV_PAIR_COPIES 16
#define GEMV_MAX_TILE 8

static_assert(GEMV_THREADS == 256, "the kernels load the 256-entry nested map one entry per thread");

template <int BT>
struct GemvTile {
    // One multiply per 32 elements instead of one per element (fewer instructions where the
    // shared-memory table is the limit); tile 8 has no registers left for the partial sums.
    static constexpr bool kFactor = BT <= 4;
    // Double-buffered loads cost 24 registers, which the larger tiles need for accumulators;
    // their FMAs hide more of the latency.
    static constexpr bool kPrefetch = BT <= 2;
};

struct GemvStage {
    uint4 w[GEMV_ROWS];
    u32 code[GEMV_ROWS];
    float nested[GEMV_ROWS];
};

__device__ __forceinline__ float bf16_lo(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(u32 v) { return __uint_as_float(v & 0xffff0000u); }

__device__ __forceinline__ u32 uint4_word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Eight bf16 of x at p (an element index that is a multiple of 8): one 16-byte load, or eight
// 2-byte loads when x itself is not 16-byte aligned. A template parameter, not a run-time flag:
// predicated-off loads of the other path would still take issue slots in the inner loop.
template <bool XVEC>
__device__ __forceinline__ uint4 load_x8(const __nv_bfloat16* __restrict__ p) {
    if constexpr (XVEC) {
        return __ldg(reinterpret_cast<const uint4*>(p));
    } else {
        const u16* h = reinterpret_cast<const u16*>(p);
        u32 v[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[i] = static_cast<u32>(__ldg(h + 2 * i)) | (static_cast<u32>(__ldg(h + 2 * i + 1)) << 16);
        }
        return make_uint4(v[0], v[1], v[2], v[3]);
    }
}

// Item j of the unit's rows: `wrow` points at the unit's first row, `block0` is the absmax
// block of its first element (rows are multiples of 32 elements and units of 4 rows, so a unit
// starts on a block boundary). Rows at or past `rows`, and every row when !ok, load nothing and
// keep zeros; the loads are predicated, not branched around, so they issue back to back.
__device__ __forceinline__ void gemv_load(GemvStage& st, const u8* __restrict__ wrow, u32 block0,
                                          const u8* __restrict__ absmax_codes,
                                          const float* __restrict__ nested_absmax, u32 in,
                                          u32 rows, u32 j, bool ok) {
#pragma unroll
    for (int k = 0; k < GEMV_ROWS; ++k) {
        const bool row_ok = ok && static_cast<u32>(k) < rows;
        const u32 e = k * in + 32 * j;  // element offset from the unit's first element
        const u32 b = block0 + e / NF4_BLOCK;
        st.w[k] = make_uint4(0u, 0u, 0u, 0u);
        ld_stream_u128_if(st.w[k], wrow + e / 2, row_ok);
        st.code[k] = ld_u8_if(absmax_codes + b, row_ok);
        st.nested[k] = ld_f32_if(nested_absmax + b / NESTED_BLOCK, row_ok);
    }
}

// The two codes of packed byte (word >> shift) & 0xff: the table entry of that byte in this
// lane's copy (`lane_off` = (lane % 16) * 8; entries are 128 bytes apart).
#define GEMV_PAIR(pairs, word, shr, shl, lane_off)                                                     \
    (*reinterpret_cast<const float2*>(reinterpret_cast<const char*>(pairs) +                          \
                                      (((((word) >> (shr)) << (shl)) & 0x7f80u) | (lane_off))))

template <int BT, bool XVEC>
__device__ __forceinline__ void gemv_step(const GemvStage& st, const float2* pairs, u32 lane_off,
                                          const float* map, float offset,
                                          const __nv_bfloat16* __restrict__ xt, u64 in, int nb,
                                          u32 j, float acc[GEMV_ROWS][BT]) {
    float s[GEMV_ROWS];
#pragma unroll
    for (int k = 0; k < GEMV_ROWS; ++k) s[k] = nf4_scale(map, st.code[k], st.nested[k], offset);

    if constexpr (GemvTile<BT>::kFactor) {
        float p[GEMV_ROWS][BT];
#pragma unroll
        for (int k = 0; k < GEMV_ROWS; ++k)
#pragma unroll
            for (int b = 0; b < BT; ++b) p[k][b] = 0.0f;
#pragma unroll
        for (int wi = 0; wi < 4; ++wi) {
            // x first (8 elements of each batch row), then every row's codes against it.
            float xf[BT][8];
#pragma unroll
            for (int b = 0; b < BT; ++b) {
                if (BT == 1 || b < nb) {
                    const uint4 xv = load_x8<XVEC>(xt + b * in + 32ull * j + 8 * wi);
                    xf[b][0] = bf16_lo(xv.x); xf[b][1] = bf16_hi(xv.x);
                    xf[b][2] = bf16_lo(xv.y); xf[b][3] = bf16_hi(xv.y);
                    xf[b][4] = bf16_lo(xv.z); xf[b][5] = bf16_hi(xv.z);
                    xf[b][6] = bf16_lo(xv.w); xf[b][7] = bf16_hi(xv.w);
                }
            }
#pragma unroll
            for (int k = 0; k < GEMV_ROWS; ++k) {
                const u32 w = uint4_word(st.w[k], wi);
                // Byte i of the word: elements 2i (x of the pair) and 2i + 1 (y).
                const float2 c0 = GEMV_PAIR(pairs, w, 0, 7, lane_off);
                const float2 c1 = GEMV_PAIR(pairs, w, 8, 7, lane_off);
                const float2 c2 = GEMV_PAIR(pairs, w, 16, 7, lane_off);
                const float2 c3 = GEMV_PAIR(pairs, w, 24, 7, lane_off);
#pragma unroll
                for (int b = 0; b < BT; ++b) {
                    if (BT == 1 || b < nb) {
                        float a = p[k][b];
                        a = __fmaf_rn(xf[b][0], c0.x, a);
                        a = __fmaf_rn(xf[b][1], c0.y, a);
                        a = __fmaf_rn(xf[b][2], c1.x, a);
                        a = __fmaf_rn(xf[b][3], c1.y, a);
                        a = __fmaf_rn(xf[b][4], c2.x, a);
                        a = __fmaf_rn(xf[b][5], c2.y, a);
                        a = __fmaf_rn(xf[b][6], c3.x, a);
                        a = __fmaf_rn(xf[b][7], c3.y, a);
                        p[k][b] = a;
                    }
                }
            }
        }
#pragma unroll
        for (int k = 0; k < GEMV_ROWS; ++k)
#pragma unroll
            for (int b = 0; b < BT; ++b) acc[k][b] = __fmaf_rn(s[k], p[k][b], acc[k][b]);
    } else {
#pragma unroll
        for (int wi = 0; wi < 4; ++wi) {
            // Every row's 8 weights first (exact dequantized values), then each batch row of x.
            float wv[GEMV_ROWS][8];
#pragma unroll
            for (int k = 0; k < GEMV_ROWS; ++k) {
                const u32 w = uint4_word(st.w[k], wi);
                const float2 c0 = GEMV_PAIR(pairs, w, 0, 7, lane_off);
                const float2 c1 = GEMV_PAIR(pairs, w, 8, 7, lane_off);
                const float2 c2 = GEMV_PAIR(pairs, w, 16, 7, lane_off);
                const float2 c3 = GEMV_PAIR(pairs, w, 24, 7, lane_off);
                wv[k][0] = __fmul_rn(c0.x, s[k]); wv[k][1] = __fmul_rn(c0.y, s[k]);
                wv[k][2] = __fmul_rn(c1.x, s[k]); wv[k][3] = __fmul_rn(c1.y, s[k]);
                wv[k][4] = __fmul_rn(c2.x, s[k]); wv[k][5] = __fmul_rn(c2.y, s[k]);
                wv[k][6] = __fmul_rn(c3.x, s[k]); wv[k][7] = __fmul_rn(c3.y, s[k]);
            }
#pragma unroll
            for (int b = 0; b < BT; ++b) {
                if (BT == 1 || b < nb) {
                    const uint4 xv = load_x8<XVEC>(xt + b * in + 32ull * j + 8 * wi);
                    const float x0 = bf16_lo(xv.x), x1 = bf16_hi(xv.x), x2 = bf16_lo(xv.y),
                                x3 = bf16_hi(xv.y), x4 = bf16_lo(xv.z), x5 = bf16_hi(xv.z),
                                x6 = bf16_lo(xv.w), x7 = bf16_hi(xv.w);
#pragma unroll
                    for (int k = 0; k < GEMV_ROWS; ++k) {
                        float a = acc[k][b];
                        a = __fmaf_rn(x0, wv[k][0], a);
                        a = __fmaf_rn(x1, wv[k][1], a);
                        a = __fmaf_rn(x2, wv[k][2], a);
                        a = __fmaf_rn(x3, wv[k][3], a);
                        a = __fmaf_rn(x4, wv[k][4], a);
                        a = __fmaf_rn(x5, wv[k][5], a);
                        a = __fmaf_rn(x6, wv[k][6], a);
                        a = __fmaf_rn(x7, wv[k][7], a);
                        acc[k][b] = a;
                    }
                }
            }
        }
    }
}

// The body of kGemvNF4_bf16_t<BT> after its shared tables are filled.
template <int BT, bool XVEC>
__device__ __forceinline__ void gemv_body(const u8* __restrict__ packed,
                                          const u8* __restrict__ absmax_codes,
                                          const float* __restrict__ nested_absmax, float offset,
                                          const __nv_bfloat16* __restrict__ x,
                                          __nv_bfloat16* __restrict__ y, int batch, int in_features,
                                          int out_features, int g_log2, const float2* pairs,
                                          const float* map, float (*red)[GEMV_ROWS * BT]) {
    const u32 G = 1u << g_log2;
    const u32 groups = GEMV_THREADS >> g_log2;
    const u32 g = threadIdx.x >> g_log2;
    const u32 lg = threadIdx.x & (G - 1);
    const u32 warp = threadIdx.x / 32;
    const u32 lane = threadIdx.x % 32;
    const u32 lane_off = (lane % GEMV_PAIR_COPIES) * sizeof(float2);
    const u32 shuffle_width = G < 32 ? G : 32;
    const u64 in = static_cast<u64>(in_features);
    const u32 in32 = static_cast<u32>(in_features);  // the launcher keeps 4 * in below 2^32
    const u32 items = in32 / 32;  // 16-byte items per row
    const u32 steps = (items + G - 1) >> g_log2;
    const u32 out = static_cast<u32>(out_features);
    const u32 units = (out + GEMV_ROWS - 1) / GEMV_ROWS;

    // Uniform per block: every warp of a group reaches the barriers below together.
    for (u32 r = 0; blockIdx.x + gridDim.x * r * groups < units; ++r) {
        const u32 unit = blockIdx.x + gridDim.x * (r * groups + g);
        const bool unit_ok = unit < units;
        const u32 row0 = unit * GEMV_ROWS;
        const u32 rows = unit_ok ? min(GEMV_ROWS, out - row0) : 0;
        const u64 base = unit_ok ? static_cast<u64>(row0) * in : 0;  // first element of the unit
        const u8* wrow = packed + base / 2;
        const u32 block0 = static_cast<u32>(base / NF4_BLOCK);

        for (int b0 = 0; b0 < batch; b0 += BT) {
            const int nb = min(BT, batch - b0);
            const __nv_bfloat16* xt = x + static_cast<u64>(b0) * in;
            float acc[GEMV_ROWS][BT];
#pragma unroll
            for (int k = 0; k < GEMV_ROWS; ++k)
#pragma unroll
                for (int b = 0; b < BT; ++b) acc[k][b] = 0.0f;

            if constexpr (GemvTile<BT>::kPrefetch) {
                GemvStage s0, s1;
                gemv_load(s0, wrow, block0, absmax_codes, nested_absmax, in32, rows, lg, lg < items);
                gemv_load(s1, wrow, block0, absmax_codes, nested_absmax, in32, rows, lg + G,
                          lg + G < items);
                for (u32 s = 0; s < steps; s += 2) {
                    const u32 j = lg + s * G;
                    if (unit_ok && j < items) {
                        gemv_step<BT, XVEC>(s0, pairs, lane_off, map, offset, xt, in, nb, j, acc);
                    }
                    gemv_load(s0, wrow, block0, absmax_codes, nested_absmax, in32, rows, j + 2 * G,
                              j + 2 * G < items);
                    if (unit_ok && j + G < items) {
                        gemv_step<BT, XVEC>(s1, pairs, lane_off, map, offset, xt, in, nb, j + G, acc);
                    }
                    gemv_load(s1, wrow, block0, absmax_codes, nested_absmax, in32, rows, j + 3 * G,
                              j + 3 * G < items);
                }
            } else {
                GemvStage s0;
                for (u32 s = 0; s < steps; ++s) {
                    const u32 j = lg + s * G;
                    gemv_load(s0, wrow, block0, absmax_codes, nested_absmax, in32, rows, j, j < items);
                    if (unit_ok && j < items) {
                        gemv_step<BT, XVEC>(s0, pairs, lane_off, map, offset, xt, in, nb, j, acc);
                    }
                }
            }

            // Sum over the group's lanes: a butterfly leaves the total in every lane.
            for (u32 off = shuffle_width / 2; off > 0; off /= 2) {
#pragma unroll
                for (int k = 0; k < GEMV_ROWS; ++k)
#pragma unroll
                    for (int b = 0; b < BT; ++b)
                        acc[k][b] = __fadd_rn(acc[k][b], __shfl_xor_sync(0xffffffffu, acc[k][b], off));
            }
            if (G <= 32) {
                // Entry e = k * BT + b is written by lane e % G of the group.
#pragma unroll
                for (int k = 0; k < GEMV_ROWS; ++k)
#pragma unroll
                    for (int b = 0; b < BT; ++b) {
                        const u32 e = k * BT + b;
                        if ((e & (G - 1)) == lg && static_cast<u32>(k) < rows && b < nb) {
                            y[static_cast<u64>(b0 + b) * out + row0 + k] = __float2bfloat16_rn(acc[k][b]);
                        }
                    }
            } else {
                // Warp totals to shared memory, then the group's first warp adds them in order.
#pragma unroll
                for (int k = 0; k < GEMV_ROWS; ++k)
#pragma unroll
                    for (int b = 0; b < BT; ++b) {
                        if (lane == static_cast<u32>(k * BT + b)) red[warp][k * BT + b] = acc[k][b];
                    }
                __syncthreads();
                const u32 warps = G / 32;
                if (warp % warps == 0 && lane < GEMV_ROWS * BT) {
                    float v = red[warp][lane];
                    for (u32 w = 1; w < warps; ++w) v = __fadd_rn(v, red[warp + w][lane]);
                    const u32 k = lane / BT;
                    const int b = static_cast<int>(lane % BT);
                    if (k < rows && b < nb) {
                        y[static_cast<u64>(b0 + b) * out + row0 + k] = __float2bfloat16_rn(v);
                    }
                }
                __syncthreads();
            }
        }
    }
}

template <int BT>
__device__ __forceinline__ void gemv_nf4(const u8* __restrict__ packed,
                                         const u8* __restrict__ absmax_codes,
                                         const float* __restrict__ nested_absmax,
                                         const float* __restrict__ nested_map, float offset,
                                         const __nv_bfloat16* __restrict__ x,
                                         __nv_bfloat16* __restrict__ y, int batch, int in_features,
                                         int out_features, int g_log2) {
    // 128-byte alignment: a lane's copy offset can be OR-ed into an entry's offset.
    __shared__ __align__(128) float2 pairs[256 * GEMV_PAIR_COPIES];
    __shared__ float map[256];
    __shared__ float red[GEMV_WARPS][GEMV_ROWS * BT];

    for (u32 i = threadIdx.x; i < 256 * GEMV_PAIR_COPIES; i += GEMV_THREADS) {
        const u32 byte = i / GEMV_PAIR_COPIES;
        pairs[i] = make_float2(kNf4Code[byte >> 4], kNf4Code[byte & 0xfu]);
    }
    map[threadIdx.x] = __ldg(nested_map + threadIdx.x);  // GEMV_THREADS == 256
    __syncthreads();

    if ((reinterpret_cast<size_t>(x) & 15) == 0) {
        gemv_body<BT, true>(packed, absmax_codes, nested_absmax, offset, x, y, batch, in_features,
                            out_features, g_log2, pairs, map, red);
    } else {
        gemv_body<BT, false>(packed, absmax_codes, nested_absmax, offset, x, y, batch, in_features,
                             out_features, g_log2, pairs, map, red);
    }
}

// Entry points, one per batch tile (written out: tests/ptx_modules.rs reads the names).
extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 2)
kGemvNF4_bf16_t1(const u8* __restrict__ packed, const u8* __restrict__ absmax_codes,
                 const float* __restrict__ nested_absmax, const float* __restrict__ nested_map,
                 float offset, const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ y,
                 int batch, int in_features, int out_features, int g_log2) {
    gemv_nf4<1>(packed, absmax_codes, nested_absmax, nested_map, offset, x, y, batch, in_features,
                out_features, g_log2);
}

extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 2)
kGemvNF4_bf16_t2(const u8* __restrict__ packed, const u8* __restrict__ absmax_codes,
                 const float* __restrict__ nested_absmax, const float* __restrict__ nested_map,
                 float offset, const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ y,
                 int batch, int in_features, int out_features, int g_log2) {
    gemv_nf4<2>(packed, absmax_codes, nested_absmax, nested_map, offset, x, y, batch, in_features,
                out_features, g_log2);
}

extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 2)
kGemvNF4_bf16_t4(const u8* __restrict__ packed, const u8* __restrict__ absmax_codes,
                 const float* __restrict__ nested_absmax, const float* __restrict__ nested_map,
                 float offset, const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ y,
                 int batch, int in_features, int out_features, int g_log2) {
    gemv_nf4<4>(packed, absmax_codes, nested_absmax, nested_map, offset, x, y, batch, in_features,
                out_features, g_log2);
}

extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 2)
kGemvNF4_bf16_t8(const u8* __restrict__ packed, const u8* __restrict__ absmax_codes,
                 const float* __restrict__ nested_absmax, const float* __restrict__ nested_map,
                 float offset, const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ y,
                 int batch, int in_features, int out_features, int g_log2) {
    gemv_nf4<8>(packed, absmax_codes, nested_absmax, nested_map, offset, x, y, batch, in_features,
                out_features, g_log2);
}

// ---------------------------------------------------------------------------------------------
// Fused NF4 x bf16 GEMV for any shape: kGemvNF4_bf16
//
// The fallback for rows that are not a multiple of 32 elements, where a row can start in the
// middle of a byte or of an absmax block. Launch: blockDim = GEMV_THREADS, one warp per output
// row, gridDim = ceil(out / GEMV_WARPS) (a smaller grid loops over the rest). Lane l takes elements l, l + 32, ... of its row; each
// weight is the exact f32 value of kDequantizeNF4_f32; products accumulate in f32 with FMAs,
// GEMV_MAX_TILE batch rows at a time; a warp-shuffle tree and one RNE rounding finish.
// ---------------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(GEMV_THREADS)
kGemvNF4_bf16(const u8* __restrict__ packed, const u8* __restrict__ absmax_codes,
              const float* __restrict__ nested_absmax, const float* __restrict__ nested_map,
              float offset, const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ y,
              int batch, int in_features, int out_features) {
    __shared__ float lut[16];
    __shared__ float map[256];
    if (threadIdx.x < 16) lut[threadIdx.x] = kNf4Code[threadIdx.x];
    map[threadIdx.x] = __ldg(nested_map + threadIdx.x);  // GEMV_THREADS == 256
    __syncthreads();

    const u32 warp = threadIdx.x / 32;
    const u32 lane = threadIdx.x % 32;
    const u64 in = static_cast<u64>(in_features);
    const u64 out = static_cast<u64>(out_features);
    // Rows are uniform per warp, so the shuffles below always see full warps.
    for (u64 row = static_cast<u64>(blockIdx.x) * GEMV_WARPS + warp; row < out;
         row += static_cast<u64>(gridDim.x) * GEMV_WARPS) {
        for (int b0 = 0; b0 < batch; b0 += GEMV_MAX_TILE) {
            const int nb = min(GEMV_MAX_TILE, batch - b0);
            const __nv_bfloat16* xt = x + static_cast<u64>(b0) * in;
            float acc[GEMV_MAX_TILE];
#pragma unroll
            for (int b = 0; b < GEMV_MAX_TILE; ++b) acc[b] = 0.0f;
            for (u64 i = lane; i < in; i += 32) {
                const float w =
                    nf4_element(packed, absmax_codes, nested_absmax, map, offset, lut, row * in + i);
#pragma unroll
                for (int b = 0; b < GEMV_MAX_TILE; ++b) {
                    if (b < nb) acc[b] = __fmaf_rn(__bfloat162float(xt[b * in + i]), w, acc[b]);
                }
            }
#pragma unroll
            for (int b = 0; b < GEMV_MAX_TILE; ++b) {
                float a = acc[b];
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) a = __fadd_rn(a, __shfl_xor_sync(0xffffffffu, a, off));
                if (lane == 0 && b < nb) y[static_cast<u64>(b0 + b) * out + row] = __float2bfloat16_rn(a);
            }
        }
    }
}
