// aim-rt VQ decoder kernels (NHWC, 16-bit activations, float32 arithmetic): GroupNorm split into a statistics
// pass (which also performs the residual add and the conv bias add and may write the sum back), a tiny finalize
// (per image and channel: scale, shift), and an apply pass that fuses normalize * gamma + beta and SiLU.
// Plus the nearest-neighbour 2x upsample. The convolutions around them are cuDNN's (torch, channels_last).
//
// Compiled per element type with -DELEM_KIND=1 (float16) or 2 (bfloat16); no CUDA headers are needed, so NVRTC
// compiles it anywhere. Each entry point takes one plain parameter struct mirrored in aim_rt/vq_fast.py.
// Layout: activations are (B, HW, C) row-major with C % 8 == 0 and 16-byte aligned rows (8 elements / thread).
//
//   vq_gn_stats     v = x (+ res) (+ bias), optionally written back rounded; per (image, chunk of rows, group):
//                   mean and M2 of v (as rounded when written). grid (nchunk, B), block cv * (256 / cv), cv = C / 8
// Every entry point is launched with at most 256 threads (__launch_bounds__(256)).
//   vq_gn_finalize  Chan-combines the chunks; scale = rstd * gamma, shift = beta + (bias - mean) * scale.
//                   grid (B, groups), block 128
//   vq_gn_apply     y = x * scale + shift, optional SiLU. grid (nblk, B), block cv * (256 / cv)
//   vq_upsample2x   nearest 2x: (B, H, W, C) -> (B, 2H, 2W, C). grid-stride over input vectors

#ifndef ELEM_KIND
#define ELEM_KIND 2
#endif

typedef unsigned short elem_t;
#if ELEM_KIND == 1
__device__ __forceinline__ float ld(elem_t v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f; }
__device__ __forceinline__ elem_t st(float f) { elem_t v; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f)); return v; }
#elif ELEM_KIND == 2
__device__ __forceinline__ float ld(elem_t v) { return __uint_as_float(((unsigned)v) << 16); }
__device__ __forceinline__ elem_t st(float f) { elem_t v; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f)); return v; }
#else
#error "vq_kernels.cu supports ELEM_KIND 1 (float16) and 2 (bfloat16)"
#endif

#ifndef LOAD_BATCH
#define LOAD_BATCH 1  // vectors each thread loads before it stores; 4 was slower on the H200 (stats: 100 registers)
#endif

union Pack8 {
  uint4 u;
  elem_t e[8];
};

__device__ __forceinline__ void load8(const elem_t* p, float* f) {
  Pack8 k;
  k.u = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = ld(k.e[i]);
}

__device__ __forceinline__ void store8(elem_t* p, const float* f) {
  Pack8 k;
#pragma unroll
  for (int i = 0; i < 8; ++i) k.e[i] = st(f[i]);
  *reinterpret_cast<uint4*>(p) = k.u;
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

struct GnStatsParams {
  const elem_t* x;     // (B, hw, c)
  const elem_t* res;   // optional, same shape: added
  const float* bias;   // optional (c): added
  elem_t* out;         // optional: v written back (may alias x)
  float* partial;      // (B, nchunk, groups, 2): mean, M2
  long long hw;
  int c, groups, rows_per_chunk, nchunk;
};

extern "C" __global__ void __launch_bounds__(256) vq_gn_stats(GnStatsParams p) {
  extern __shared__ float sm[];  // [2][blockDim.x * 8]
  const int cv = p.c >> 3;
  const int tpr = blockDim.x / cv;  // rows in flight
  const int t = threadIdx.x;
  const int vi = t % cv, r0 = t / cv;
  const long long b = blockIdx.y;
  const long long row_begin = (long long)blockIdx.x * p.rows_per_chunk;
  long long row_end = row_begin + p.rows_per_chunk;
  if (row_end > p.hw) row_end = p.hw;
  float s[8], q[8], bias[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    s[i] = 0.0f;
    q[i] = 0.0f;
    bias[i] = p.bias ? p.bias[vi * 8 + i] : 0.0f;
  }
  // LOAD_BATCH rows per thread are loaded before any is stored (`out` may alias `x`, so the compiler cannot hoist
  // loads above stores by itself). Measured on the H200 (bench/results/vq_bench_h200_2026-11-29.json): 1 is
  // faster overall than 4 (10.0 vs 10.7 ms at batch 16): the register cost outweighs the extra loads in flight.
  for (long long r = row_begin + r0; r < row_end; r += (long long)LOAD_BATCH * tpr) {
    float v[LOAD_BATCH][8];
    size_t off[LOAD_BATCH];
    bool ok[LOAD_BATCH];
#pragma unroll
    for (int u = 0; u < LOAD_BATCH; ++u) {
      const long long rr = r + (long long)u * tpr;
      ok[u] = rr < row_end;
      off[u] = ((size_t)b * (size_t)p.hw + (size_t)(ok[u] ? rr : row_begin)) * (size_t)p.c + (size_t)vi * 8;
      if (ok[u]) load8(p.x + off[u], v[u]);
    }
    if (p.res) {
#pragma unroll
      for (int u = 0; u < LOAD_BATCH; ++u) {
        if (!ok[u]) continue;
        float w[8];
        load8(p.res + off[u], w);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[u][i] += w[i];
      }
    }
#pragma unroll
    for (int u = 0; u < LOAD_BATCH; ++u) {
      if (!ok[u]) continue;
#pragma unroll
      for (int i = 0; i < 8; ++i) v[u][i] += bias[i];
      if (p.out) {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[u][i] = ld(st(v[u][i]));
        store8(p.out + off[u], v[u]);
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        s[i] += v[u][i];
        q[i] += v[u][i] * v[u][i];
      }
    }
  }
  float* ss = sm;
  float* qs = sm + blockDim.x * 8;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    ss[r0 * p.c + vi * 8 + i] = s[i];
    qs[r0 * p.c + vi * 8 + i] = q[i];
  }
  __syncthreads();
  const int cg = p.c / p.groups;
  for (int g = t; g < p.groups; g += blockDim.x) {
    float S = 0.0f, Q = 0.0f;
    for (int rr = 0; rr < tpr; ++rr)
      for (int j = 0; j < cg; ++j) {
        S += ss[rr * p.c + g * cg + j];
        Q += qs[rr * p.c + g * cg + j];
      }
    const float n = (float)((row_end > row_begin ? row_end - row_begin : 0) * cg);
    const float mean = n > 0.0f ? S / n : 0.0f;
    const float m2 = n > 0.0f ? fmaxf(Q - S * mean, 0.0f) : 0.0f;
    float* dst = p.partial + (((size_t)b * p.nchunk + blockIdx.x) * p.groups + g) * 2;
    dst[0] = mean;
    dst[1] = m2;
  }
}

struct GnFinalizeParams {
  const float* partial;  // from vq_gn_stats
  const float* gamma;    // (c)
  const float* beta;     // (c)
  const float* bias;     // optional (c): the statistics included it, the apply pass's input does not
  float* scale;          // (B, c)
  float* shift;          // (B, c)
  long long hw;
  int c, groups, rows_per_chunk, nchunk;
  float eps;
};

__device__ __forceinline__ void chan_merge(float& n, float& mean, float& m2, float nb, float meanb, float m2b) {
  const float nn = n + nb;
  if (nn <= 0.0f) return;
  const float d = meanb - mean;
  mean += d * (nb / nn);
  m2 += m2b + d * d * (n * nb / nn);
  n = nn;
}

// grid (B, groups), block 128: the block combines one (image, group) over the chunks (thread-strided, then a
// shuffle tree and the 4 warps), then writes that group's channels.
extern "C" __global__ void __launch_bounds__(256) vq_gn_finalize(GnFinalizeParams p) {
  __shared__ float s_n[8], s_mean[8], s_m2[8];
  const long long b = blockIdx.x;
  const int g = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int cg = p.c / p.groups;
  float n = 0.0f, mean = 0.0f, m2 = 0.0f;
  for (int k = threadIdx.x; k < p.nchunk; k += blockDim.x) {
    long long rows = p.hw - (long long)k * p.rows_per_chunk;
    if (rows > p.rows_per_chunk) rows = p.rows_per_chunk;
    if (rows <= 0) continue;
    const float* src = p.partial + (((size_t)b * p.nchunk + k) * p.groups + g) * 2;
    chan_merge(n, mean, m2, (float)(rows * cg), src[0], src[1]);
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float nb = __shfl_xor_sync(0xffffffffu, n, o);
    const float mb = __shfl_xor_sync(0xffffffffu, mean, o);
    const float m2b = __shfl_xor_sync(0xffffffffu, m2, o);
    chan_merge(n, mean, m2, nb, mb, m2b);
  }
  if (lane == 0) {
    s_n[warp] = n;
    s_mean[warp] = mean;
    s_m2[warp] = m2;
  }
  __syncthreads();
  n = s_n[0];
  mean = s_mean[0];
  m2 = s_m2[0];
  for (int w = 1; w < nwarps; ++w) chan_merge(n, mean, m2, s_n[w], s_mean[w], s_m2[w]);
  const float rstd = 1.0f / sqrtf(m2 / n + p.eps);
  for (int j = threadIdx.x; j < cg; j += blockDim.x) {
    const int ch = g * cg + j;
    const float a = rstd * p.gamma[ch];
    float sh = p.beta[ch] - mean * a;
    if (p.bias) sh += p.bias[ch] * a;
    p.scale[b * p.c + ch] = a;
    p.shift[b * p.c + ch] = sh;
  }
}

struct GnApplyParams {
  const elem_t* x;     // (B, hw, c)
  const float* scale;  // (B, c)
  const float* shift;  // (B, c)
  elem_t* out;         // (B, hw, c), may alias x
  long long hw, total_vec;
  int c, silu;
};

// grid (nblk, B), block cv * (256 / cv): the block size and the stride are multiples of cv, so each thread keeps
// one channel vector and its scale/shift in registers.
extern "C" __global__ void __launch_bounds__(256) vq_gn_apply(GnApplyParams p) {
  const int cv = p.c >> 3;
  const int vi = threadIdx.x % cv;
  const long long b = blockIdx.y;
  const long long per_image = p.hw * cv;
  float a[8], s[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    a[k] = p.scale[b * p.c + vi * 8 + k];
    s[k] = p.shift[b * p.c + vi * 8 + k];
  }
  const elem_t* x = p.x + b * per_image * 8;
  elem_t* out = p.out + b * per_image * 8;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < per_image; j += LOAD_BATCH * stride) {
    float v[LOAD_BATCH][8];
#pragma unroll
    for (int u = 0; u < LOAD_BATCH; ++u)
      if (j + u * stride < per_image) load8(x + (j + u * stride) * 8, v[u]);
#pragma unroll
    for (int u = 0; u < LOAD_BATCH; ++u) {
      if (j + u * stride >= per_image) continue;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float y = v[u][k] * a[k] + s[k];
        v[u][k] = p.silu ? silu(y) : y;
      }
      store8(out + (j + u * stride) * 8, v[u]);
    }
  }
}

struct UpsampleParams {
  const elem_t* x;  // (B, h, w, c)
  elem_t* out;      // (B, 2h, 2w, c)
  long long total_vec;
  int h, w, c;
};

extern "C" __global__ void __launch_bounds__(256) vq_upsample2x(UpsampleParams p) {
  const long long cv = p.c >> 3;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.total_vec; i += stride) {
    const long long vi = i % cv;
    const long long pix = i / cv;
    const long long xw = pix % p.w;
    const long long t = pix / p.w;
    const long long yh = t % p.h;
    const long long b = t / p.h;
    const uint4 v = *reinterpret_cast<const uint4*>(p.x + i * 8);
    const long long W2 = 2LL * p.w;
#pragma unroll
    for (int dy = 0; dy < 2; ++dy)
#pragma unroll
      for (int dx = 0; dx < 2; ++dx) {
        const long long off = ((b * 2 * p.h + 2 * yh + dy) * W2 + 2 * xw + dx) * p.c + vi * 8;
        *reinterpret_cast<uint4*>(p.out + off) = v;
      }
  }
}

// The nearest 2x upsample folded into the following 3x3 conv: that conv, on the zero-padded low-resolution
// input, is one 2x2 conv with 4 * C outputs (one C-block per output phase (dy, dx), tap weights pre-summed),
// giving y (B, h+1, w+1, 4c); this interleaves the phases and adds the bias:
//   out[b, 2i+dy, 2j+dx, c] = y[b, i+dy, j+dx, (2dy+dx) c + c] + bias[c]
struct SubpixelParams {
  const elem_t* y;     // (B, h+1, w+1, 4c)
  const float* bias;   // optional (c)
  elem_t* out;         // (B, 2h, 2w, c)
  long long total_vec;
  int h, w, c;
};

extern "C" __global__ void __launch_bounds__(256) vq_subpixel_gather(SubpixelParams p) {
  const long long cv = p.c >> 3;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long W2 = 2LL * p.w, H2 = 2LL * p.h;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.total_vec; i += stride) {
    const long long vi = i % cv;
    const long long pix = i / cv;
    const long long ox = pix % W2;
    const long long t = pix / W2;
    const long long oy = t % H2;
    const long long b = t / H2;
    const int dy = (int)(oy & 1), dx = (int)(ox & 1);
    const long long iy = (oy >> 1) + dy, ix = (ox >> 1) + dx;
    const long long src = ((b * (p.h + 1) + iy) * (p.w + 1) + ix) * 4LL * p.c + (long long)(2 * dy + dx) * p.c + vi * 8;
    float v[8];
    load8(p.y + src, v);
    if (p.bias) {
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] += p.bias[vi * 8 + k];
    }
    store8(p.out + i * 8, v);
  }
}
