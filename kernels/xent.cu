// Fused next-token cross-entropy over a chunk of logits (crates/model/src/loss.rs): the GPU twin
// of `xent_fused_cpu`. For each row r of z ([m, vocab], f32, before the final softcap c):
//
//   l_j     = c * tanh(z_j / c)             (z_j when c == 0: no softcap)
//   lse     = log(sum_j exp(l_j - max_j l)) + max_j l      (the sum in f64, as on the CPU)
//   nll[r]  = lse - l_target
//   dz_j    = (exp(l_j - lse) - [j == target]) * (1 - (l_j / c)^2)   (when `grad`)
//
// so a chunk needs its logits and one [m, vocab] gradient buffer, no softmax or one-hot
// temporaries. One thread block per row; each thread walks the row at a stride of the block.

#define XENT_THREADS 1024

__device__ __forceinline__ float capped(float z, float cap) {
    return cap > 0.0f ? cap * tanhf(z / cap) : z;
}

// Block-wide reductions through shared memory; every thread gets the result.
__device__ float block_max(float v, float* scratch) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (blockDim.x + 31) / 32 ? scratch[lane] : -INFINITY;
        for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();
    v = scratch[0];
    __syncthreads();
    return v;
}

__device__ double block_sum(double v, double* scratch) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (blockDim.x + 31) / 32 ? scratch[lane] : 0.0;
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();
    v = scratch[0];
    __syncthreads();
    return v;
}

// Launch: gridDim = m rows, blockDim = XENT_THREADS. `dz` may be null when grad == 0.
extern "C" __global__ void __launch_bounds__(XENT_THREADS)
kXentRows_f32(const float* __restrict__ z, const unsigned int* __restrict__ targets,
              float* __restrict__ dz, double* __restrict__ nll, int vocab, float cap, int grad) {
    __shared__ float fscratch[32];
    __shared__ double dscratch[32];
    const long long row = blockIdx.x;
    const float* zr = z + row * vocab;
    const unsigned int target = targets[row];

    float mx = -INFINITY;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, capped(zr[j], cap));
    mx = block_max(mx, fscratch);

    double sum = 0.0;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) sum += (double)expf(capped(zr[j], cap) - mx);
    sum = block_sum(sum, dscratch);
    const float lse = (float)log(sum) + mx;

    if (threadIdx.x == 0) nll[row] = (double)(lse - capped(zr[target], cap));
    if (!grad) return;
    float* dr = dz + row * vocab;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float l = capped(zr[j], cap);
        float g = expf(l - lse) - (j == (int)target ? 1.0f : 0.0f);
        if (cap > 0.0f) {
            const float t = l / cap;
            g *= 1.0f - t * t;
        }
        dr[j] = g;
    }
}
