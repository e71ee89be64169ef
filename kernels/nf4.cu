// NF4 (bitsandbytes layout, double-quantized absmax) kernels, compiled at run time with NVRTC.
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
// with --fmad=false, so no multiply-add is contracted into an FMA: the results are bit-identical
// to the CPU codec (`Nf4Tensor::dequantize*`), which performs the same two roundings per absmax
// and one per element.
//
// Only NVRTC-provided headers are used (cuda_bf16.h, cuda_fp16.h from the CUDA runtime headers).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NF4_BLOCK 64        // elements per absmax
#define NESTED_BLOCK 256    // absmax codes per nested scale

// bitsandbytes' NF4 table (index 0 = -1, 7 = 0, 15 = 1); identical bits to rupantor_quant::NF4_CODE
// (checked by crates/quant/tests/nvrtc_compile.rs against the PTX initializer).
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

// Double-quant step: the absmax of 64-element block `b`, with the CPU's two roundings.
__device__ __forceinline__ float nf4_block_absmax(const u8* __restrict__ absmax_codes,
                                                  const float* __restrict__ nested_absmax,
                                                  const float* __restrict__ nested_map,
                                                  float offset, u64 b) {
    const float code = __ldg(nested_map + __ldg(absmax_codes + b));
    const float scale = __ldg(nested_absmax + b / NESTED_BLOCK);
    return __fadd_rn(__fmul_rn(code, scale), offset);
}

// Packed bytes 4w .. 4w+3 as a little-endian word (byte 0 in bits 0..7). Bytes past the end read
// as zero; a misaligned base pointer falls back to byte loads.
__device__ __forceinline__ u32 nf4_load_word(const u8* __restrict__ packed, u64 nbytes, u64 w,
                                             bool aligned) {
    const u64 byte = w * 4;
    if (aligned && byte + 4 <= nbytes) {
        return __ldg(reinterpret_cast<const unsigned int*>(packed + byte));
    }
    u32 word = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        if (byte + k < nbytes) word |= static_cast<u32>(__ldg(packed + byte + k)) << (8 * k);
    }
    return word;
}

// The 8 elements of a packed word: byte j holds element 2j (high nibble) and 2j+1 (low nibble).
__device__ __forceinline__ void nf4_expand_word(u32 word, float scale, const float* lut, float v[8]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const u32 byte = (word >> (8 * j)) & 0xffu;
        v[2 * j] = __fmul_rn(lut[byte >> 4], scale);
        v[2 * j + 1] = __fmul_rn(lut[byte & 0xfu], scale);
    }
}

// Stores of 8 consecutive elements starting at element e (a multiple of 8). `vec` says the output
// pointer is 16-byte aligned, so whole groups go out as 16-byte stores.
__device__ __forceinline__ void nf4_store8(float* __restrict__ out, u64 e, const float v[8], u64 n,
                                           bool vec) {
    if (vec && e + 8 <= n) {
        float4* dst = reinterpret_cast<float4*>(out + e);
        dst[0] = make_float4(v[0], v[1], v[2], v[3]);
        dst[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            if (e + k < n) out[e + k] = v[k];
        }
    }
}

__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    return static_cast<u32>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           (static_cast<u32>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
    return static_cast<u32>(__half_as_ushort(__float2half_rn(lo))) |
           (static_cast<u32>(__half_as_ushort(__float2half_rn(hi))) << 16);
}

__device__ __forceinline__ void nf4_store8(__nv_bfloat16* __restrict__ out, u64 e, const float v[8],
                                           u64 n, bool vec) {
    if (vec && e + 8 <= n) {
        *reinterpret_cast<uint4*>(out + e) = make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]),
                                                        pack_bf16x2(v[4], v[5]), pack_bf16x2(v[6], v[7]));
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            if (e + k < n) out[e + k] = __float2bfloat16_rn(v[k]);
        }
    }
}

__device__ __forceinline__ void nf4_store8(__half* __restrict__ out, u64 e, const float v[8], u64 n,
                                           bool vec) {
    if (vec && e + 8 <= n) {
        *reinterpret_cast<uint4*>(out + e) = make_uint4(pack_f16x2(v[0], v[1]), pack_f16x2(v[2], v[3]),
                                                        pack_f16x2(v[4], v[5]), pack_f16x2(v[6], v[7]));
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            if (e + k < n) out[e + k] = __float2half_rn(v[k]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantization: kDequantizeNF4_{f32,bf16,f16}
//
// Launch: blockDim = 256 threads (DQ_THREADS, fixed), gridDim = ceil(ceil(n/2) / 4 / 1024).
// A thread block owns a tile of 1024 packed words (4096 bytes = 8192 elements = 128 absmax
// blocks). Its threads first dequantize the tile's 128 absmax values into shared memory (the
// fused double-quant step) and copy the 16-entry NF4 table there; then each thread expands 4
// words at stride 256 words (one coalesced 4-byte load per word per thread) into 8 elements each
// and writes them with 16-byte stores (2 per word for f32, 1 for bf16/f16).
// ---------------------------------------------------------------------------------------------

#define DQ_THREADS 256
#define DQ_WORDS_PER_THREAD 4
#define DQ_TILE_WORDS (DQ_THREADS * DQ_WORDS_PER_THREAD)
#define DQ_TILE_BLOCKS (DQ_TILE_WORDS * 8 / NF4_BLOCK)

template <typename T>
__device__ __forceinline__ void dequantize_nf4_tile(const u8* __restrict__ packed,
                                                    const u8* __restrict__ absmax_codes,
                                                    const float* __restrict__ nested_absmax,
                                                    const float* __restrict__ nested_map, float offset,
                                                    T* __restrict__ out, u64 n) {
    __shared__ float lut[16];
    __shared__ float absmax[DQ_TILE_BLOCKS];

    const u64 nbytes = (n + 1) / 2;
    const u64 nblocks = (n + NF4_BLOCK - 1) / NF4_BLOCK;
    const u64 tile_word0 = static_cast<u64>(blockIdx.x) * DQ_TILE_WORDS;
    const u64 tile_block0 = tile_word0 * 8 / NF4_BLOCK;

    if (threadIdx.x < 16) lut[threadIdx.x] = kNf4Code[threadIdx.x];
    for (u32 i = threadIdx.x; i < DQ_TILE_BLOCKS; i += DQ_THREADS) {
        const u64 b = tile_block0 + i;
        absmax[i] = b < nblocks ? nf4_block_absmax(absmax_codes, nested_absmax, nested_map, offset, b) : 0.0f;
    }
    __syncthreads();

    const bool in_aligned = (reinterpret_cast<size_t>(packed) & 3) == 0;
    const bool out_vec = (reinterpret_cast<size_t>(out) & 15) == 0;

#pragma unroll
    for (int k = 0; k < DQ_WORDS_PER_THREAD; ++k) {
        const u32 local = k * DQ_THREADS + threadIdx.x;
        const u64 w = tile_word0 + local;
        const u64 e0 = w * 8;
        if (e0 < n) {
            const u32 word = nf4_load_word(packed, nbytes, w, in_aligned);
            float v[8];
            nf4_expand_word(word, absmax[local * 8 / NF4_BLOCK], lut, v);
            nf4_store8(out, e0, v, n, out_vec);
        }
    }
}

extern "C" __global__ void __launch_bounds__(DQ_THREADS)
kDequantizeNF4_f32(const u8* __restrict__ packed, const u8* __restrict__ absmax_codes,
                   const float* __restrict__ nested_absmax, const float* __restrict__ nested_map,
                   float offset, float* __restrict__ out, u64 n) {
    dequantize_nf4_tile<float>(packed, absmax_codes, nested_absmax, nested_map, offset, out, n);
}

extern "C" __global__ void __launch_bounds__(DQ_THREADS)
kDequantizeNF4_bf16(const u8* __restrict__ packed, const u8* __restrict__ absmax_codes,
                    const float* __restrict__ nested_absmax, const float* __restrict__ nested_map,
                    float offset, __nv_bfloat16* __restrict__ out, u64 n) {
    dequantize_nf4_tile<__nv_bfloat16>(packed, absmax_codes, nested_absmax, nested_map, offset, out, n);
}

extern "C" __global__ void __launch_bounds__(DQ_THREADS)
kDequantizeNF4_f16(const u8* __restrict__ packed, const u8* __restrict__ absmax_codes,
                   const float* __restrict__ nested_absmax, const float* __restrict__ nested_map,
                   float offset, __half* __restrict__ out, u64 n) {
    dequantize_nf4_tile<__half>(packed, absmax_codes, nested_absmax, nested_map, offset, out, n);
}

// ---------------------------------------------------------------------------------------------
// Fused NF4 x bf16 GEMV for decoding: kGemvNF4_bf16
//
//   y[b, o] = sum_i x[b, i] * W[o, i]      W: [out_features, in_features] NF4 (row-major numel order)
//
// Launch: blockDim = 256 threads = 8 warps, one warp per output row; gridDim = ceil(out / 8).
// W's element is the exact f32 value kDequantizeNF4_f32 produces; x is widened to f32 exactly;
// products are accumulated in f32 with explicit FMAs (`__fmaf_rn`), reduced across the warp with
// shuffles and rounded once to bf16 (RNE). Batches are processed 8 rows of x at a time from
// registers (any batch works; batch <= 8 reads W exactly once).
// Fast path (in_features % 8 == 0, packed 4-byte and x 16-byte aligned): lane l reads words
// l, l+32, ... of its row (coalesced 128-byte warp loads) and the matching 8 bf16 of each x row
// as one 16-byte load. Otherwise an element-wise path handles rows that start mid-byte/mid-block.
// ---------------------------------------------------------------------------------------------

#define GEMV_WARPS 8
#define GEMV_THREADS (GEMV_WARPS * 32)
#define GEMV_BATCH_TILE 8

__device__ __forceinline__ float bf16_bits_to_float(u32 bits16) {
    return __uint_as_float(bits16 << 16);
}

extern "C" __global__ void __launch_bounds__(GEMV_THREADS)
kGemvNF4_bf16(const u8* __restrict__ packed, const u8* __restrict__ absmax_codes,
              const float* __restrict__ nested_absmax, const float* __restrict__ nested_map,
              float offset, const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ y,
              int batch, int in_features, int out_features) {
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = kNf4Code[threadIdx.x];
    __syncthreads();

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const long long row = static_cast<long long>(blockIdx.x) * GEMV_WARPS + warp;
    if (row >= out_features) return;  // uniform per warp: shuffles below see full warps

    const u64 in = static_cast<u64>(in_features);
    const u64 row0 = static_cast<u64>(row) * in;  // element index of W[row, 0]
    const bool fast = (in_features % 8 == 0) && (reinterpret_cast<size_t>(packed) & 3) == 0 &&
                      (reinterpret_cast<size_t>(x) & 15) == 0;

    for (int b0 = 0; b0 < batch; b0 += GEMV_BATCH_TILE) {
        const int nb = min(GEMV_BATCH_TILE, batch - b0);
        const __nv_bfloat16* xb = x + static_cast<u64>(b0) * in;
        float acc[GEMV_BATCH_TILE];
#pragma unroll
        for (int b = 0; b < GEMV_BATCH_TILE; ++b) acc[b] = 0.0f;

        if (fast) {
            const unsigned int* wrow = reinterpret_cast<const unsigned int*>(packed + row0 / 2);
            const int words = in_features / 8;
            for (int k = lane; k < words; k += 32) {
                const u64 e = row0 + static_cast<u64>(k) * 8;
                const float scale =
                    nf4_block_absmax(absmax_codes, nested_absmax, nested_map, offset, e / NF4_BLOCK);
                float wv[8];
                nf4_expand_word(__ldg(wrow + k), scale, lut, wv);
#pragma unroll
                for (int b = 0; b < GEMV_BATCH_TILE; ++b) {
                    if (b < nb) {
                        const uint4 xv =
                            __ldg(reinterpret_cast<const uint4*>(xb + static_cast<u64>(b) * in) + k);
                        float a = acc[b];
                        a = __fmaf_rn(bf16_bits_to_float(xv.x & 0xffffu), wv[0], a);
                        a = __fmaf_rn(bf16_bits_to_float(xv.x >> 16), wv[1], a);
                        a = __fmaf_rn(bf16_bits_to_float(xv.y & 0xffffu), wv[2], a);
                        a = __fmaf_rn(bf16_bits_to_float(xv.y >> 16), wv[3], a);
                        a = __fmaf_rn(bf16_bits_to_float(xv.z & 0xffffu), wv[4], a);
                        a = __fmaf_rn(bf16_bits_to_float(xv.z >> 16), wv[5], a);
                        a = __fmaf_rn(bf16_bits_to_float(xv.w & 0xffffu), wv[6], a);
                        a = __fmaf_rn(bf16_bits_to_float(xv.w >> 16), wv[7], a);
                        acc[b] = a;
                    }
                }
            }
        } else {
            for (int i = lane; i < in_features; i += 32) {
                const u64 e = row0 + static_cast<u64>(i);
                const u32 byte = __ldg(packed + e / 2);
                const u32 q = (e & 1) ? (byte & 0xfu) : (byte >> 4);
                const float scale =
                    nf4_block_absmax(absmax_codes, nested_absmax, nested_map, offset, e / NF4_BLOCK);
                const float wv = __fmul_rn(lut[q], scale);
#pragma unroll
                for (int b = 0; b < GEMV_BATCH_TILE; ++b) {
                    if (b < nb) {
                        const float xv = __bfloat162float(xb[static_cast<u64>(b) * in + i]);
                        acc[b] = __fmaf_rn(xv, wv, acc[b]);
                    }
                }
            }
        }

#pragma unroll
        for (int b = 0; b < GEMV_BATCH_TILE; ++b) {
            float a = acc[b];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) a = __fadd_rn(a, __shfl_xor_sync(0xffffffffu, a, off));
            if (lane == 0 && b < nb) {
                y[static_cast<u64>(b0 + b) * static_cast<u64>(out_features) + static_cast<u64>(row)] =
                    __float2bfloat16_rn(a);
            }
        }
    }
}
