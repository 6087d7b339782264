// aim-rt VQ decoder kernels (NHWC, 16-bit activations, float32 arithmetic). The convolutions between them are
// cuDNN's (torch, channels_last), except the final 3-channel one (vq_conv_out).
//
// Compiled per element type with -DELEM_KIND=1 (float16) or 2 (bfloat16); no CUDA headers are needed, so NVRTC
// compiles it anywhere. Each entry point takes one plain parameter struct mirrored in aim_rt/vq_fast.py.
// Layout: activations are (B, HW, C) row-major with C % 8 == 0 and 16-byte aligned rows (8 elements / vector).
// Every entry point is launched with at most 256 threads (__launch_bounds__(256)).
//
//   vq_gn_stats     v = x (+ res) (+ bias), optionally written back rounded; GroupNorm statistics of v per image,
//                   turned into per-(image, channel) scale and shift by the last block of each image (no separate
//                   finalize launch). x may instead be a subpixel conv output (the nearest 2x upsample folded
//                   into the conv): rows are then gathered from its 4 phases. grid (nchunk, B), block cv * (256/cv);
//                   nchunk is a function of the image shape alone (batch-invariant results)
//   vq_gn_apply     y = x * scale + shift, optional SiLU. grid (tiles, B), block cv * (256 / cv)
//   vq_upsample2x   nearest 2x: (B, H, W, C) -> (B, 2H, 2W, C). grid-stride over input vectors
//   vq_conv_out     norm_out apply + SiLU + the final 3x3 conv (<= 8 outputs, mma.sync) + bias, written as float32
//                   NCHW images. persistent: grid <= (W/32)(H/4)B tiles, block 256

#ifndef ELEM_KIND
#define ELEM_KIND 2
#endif

typedef unsigned short elem_t;
#if ELEM_KIND == 1
__device__ __forceinline__ float ld(elem_t v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f; }
__device__ __forceinline__ elem_t st(float f) { elem_t v; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f)); return v; }
#define MMA_TYPE "f16"
#elif ELEM_KIND == 2
__device__ __forceinline__ float ld(elem_t v) { return __uint_as_float(((unsigned)v) << 16); }
__device__ __forceinline__ elem_t st(float f) { elem_t v; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f)); return v; }
#define MMA_TYPE "bf16"
#else
#error "vq_kernels.cu supports ELEM_KIND 1 (float16) and 2 (bfloat16)"
#endif

// Vectors each thread loads before it computes or stores: loads in flight are what a bandwidth-bound pass needs
// (the data stays packed, 4 registers per vector, until used).
#ifndef VEC_BATCH
#define VEC_BATCH 4
#endif
// Chunk partials each thread of vq_gn_stats's last block loads before it merges them.
#ifndef COMBINE_BATCH
#define COMBINE_BATCH 8
#endif

union Pack8 {
  uint4 u;
  elem_t e[8];
};

__device__ __forceinline__ void unpack8(uint4 u, float* f) {
  Pack8 k;
  k.u = u;
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = ld(k.e[i]);
}

__device__ __forceinline__ uint4 pack8(const float* f) {
  Pack8 k;
#pragma unroll
  for (int i = 0; i < 8; ++i) k.e[i] = st(f[i]);
  return k.u;
}

// x * sigmoid(x) with the approximate exp2 and reciprocal (two MUFU ops; an IEEE division costs more than the
// memory time of these passes). x -> -inf: exp -> inf, rcp -> 0, result -0.
__device__ __forceinline__ float silu(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.0f + __expf(-x)));
  return x * r;
}

// ----- GroupNorm statistics (+ residual / bias add, + write-back, + subpixel gather), finalize in the last block
struct GnStatsParams {
  const elem_t* x;        // (B, hw, c); or, when sub_w > 0, the subpixel conv output (B, sub_h+1, sub_w+1, 4c)
  const elem_t* res;      // optional, (B, hw, c): added
  const float* bias;      // optional (c): added
  elem_t* out;            // optional: v written (may alias x unless sub_w > 0)
  float* partial;         // (B, nchunk, groups, 2): mean, M2 of each chunk
  unsigned* counter;      // (B): zero on entry, left zero (blocks done per image); one buffer per call site
  const float* gamma;     // (c); null: no statistics, only the write
  const float* beta;      // (c)
  const float* fold;      // optional (c): in the statistics but not in the apply pass's input: shift += fold*scale
  float* scale;           // (B, c)
  float* shift;           // (B, c)
  long long hw;
  int c, groups, rows_per_chunk, nchunk, sub_h, sub_w;
  float eps;
};

__device__ __forceinline__ void chan_merge(float& n, float& mean, float& m2, float nb, float meanb, float m2b) {
  const float nn = n + nb;
  if (nn <= 0.0f) return;
  const float d = meanb - mean, w = nb * __frcp_rn(nn);  // one correctly rounded reciprocal, no division
  mean += d * w;
  m2 += m2b + d * d * (n * w);
  n = nn;
}

extern "C" __global__ void __launch_bounds__(256, 3) vq_gn_stats(GnStatsParams p) {
  extern __shared__ float sm[];  // [2][blockDim.x * 8] per-thread channel sums (then group partials), [c] bias
  __shared__ float f_n[256], f_mean[256], f_m2[256];
  __shared__ int s_last;
  const int cv = p.c >> 3;
  const int tpr = blockDim.x / cv;  // rows in flight
  const int t = threadIdx.x;
  const int vi = t % cv, r0 = t / cv;
  const long long b = blockIdx.y;
  const long long row_begin = (long long)blockIdx.x * p.rows_per_chunk;
  long long row_end = row_begin + p.rows_per_chunk;
  if (row_end > p.hw) row_end = p.hw;
  const bool want_stats = p.gamma != nullptr;
  float* sbias = sm + 2 * blockDim.x * 8;  // the bias from shared memory: registers are this kernel's limit
  for (int i = t; i < p.c; i += blockDim.x) sbias[i] = p.bias ? p.bias[i] : 0.0f;
  __syncthreads();
  float s[8], q[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    s[i] = 0.0f;
    q[i] = 0.0f;
  }
  // 32-bit offsets within image b (an image has < 2^31 elements): fewer registers, more blocks per SM
  const size_t img = (size_t)b * (size_t)p.hw * (size_t)p.c;
  const elem_t* xb = p.x + (p.sub_w > 0 ? (size_t)b * (p.sub_h + 1) * (size_t)(p.sub_w + 1) * 4 * p.c : img);
  const elem_t* resb = p.res ? p.res + img : nullptr;
  elem_t* outb = p.out ? p.out + img : nullptr;
  const int W2 = 2 * p.sub_w;
  for (int r = (int)row_begin + r0; r < (int)row_end; r += VEC_BATCH * tpr) {
    uint4 xv[VEC_BATCH], rv[VEC_BATCH];
    // All loads of the batch are issued before any store (`out` may alias `x`).
#pragma unroll
    for (int u = 0; u < VEC_BATCH; ++u) {
      const int rr = r + u * tpr;
      if (rr < (int)row_end) {
        int src = rr * p.c + vi * 8;
        if (W2 > 0) {  // output pixel (oy, ox) = phase (oy & 1, ox & 1) of y at ((oy >> 1) + dy, (ox >> 1) + dx)
          const int oy = rr / W2, ox = rr - oy * W2;
          const int dy = oy & 1, dx = ox & 1;
          src = (((oy >> 1) + dy) * (p.sub_w + 1) + (ox >> 1) + dx) * 4 * p.c + (2 * dy + dx) * p.c + vi * 8;
        }
        xv[u] = *reinterpret_cast<const uint4*>(xb + src);
        if (resb) rv[u] = *reinterpret_cast<const uint4*>(resb + rr * p.c + vi * 8);
      }
    }
#pragma unroll
    for (int u = 0; u < VEC_BATCH; ++u) {
      const int rr = r + u * tpr;
      if (rr >= (int)row_end) continue;
      float v[8];
      unpack8(xv[u], v);
      if (resb) {
        float w[8];
        unpack8(rv[u], w);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] += w[i];
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] += sbias[vi * 8 + i];
      if (outb) {
        const uint4 o = pack8(v);
        *reinterpret_cast<uint4*>(outb + rr * p.c + vi * 8) = o;
        unpack8(o, v);  // statistics of the values as written
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        s[i] += v[i];
        q[i] += v[i] * v[i];
      }
    }
  }
  if (!want_stats) return;

  // block reduction: per-thread channel sums -> (part, group) sums -> per-group mean / M2 of this chunk
  float* ss = sm;
  float* qs = sm + blockDim.x * 8;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    ss[r0 * p.c + vi * 8 + i] = s[i];
    qs[r0 * p.c + vi * 8 + i] = q[i];
  }
  __syncthreads();
  const int G = p.groups, cg = p.c / p.groups;
  const int parts = blockDim.x / G;  // >= 4: blocks have >= 128 threads, groups == 32
  float S = 0.0f, Q = 0.0f;
  const int g = t % G, part = t / G;
  if (part < parts)
    for (int rr = part; rr < tpr; rr += parts)
      for (int j = 0; j < cg; ++j) {
        S += ss[rr * p.c + g * cg + j];
        Q += qs[rr * p.c + g * cg + j];
      }
  __syncthreads();
  if (part < parts) {
    ss[part * G + g] = S;
    qs[part * G + g] = Q;
  }
  __syncthreads();
  if (t < G) {
    S = 0.0f;
    Q = 0.0f;
    for (int k = 0; k < parts; ++k) {
      S += ss[k * G + t];
      Q += qs[k * G + t];
    }
    const float n = (float)((row_end > row_begin ? row_end - row_begin : 0) * cg);
    const float mean = n > 0.0f ? S / n : 0.0f;
    const float m2 = n > 0.0f ? fmaxf(Q - S * mean, 0.0f) : 0.0f;
    float* dst = p.partial + (((size_t)b * p.nchunk + blockIdx.x) * G + t) * 2;
    dst[0] = mean;
    dst[1] = m2;
  }
  __syncthreads();
  if (t == 0) {  // one fence: cumulative over the block's writes ordered before it by the barrier
    __threadfence();
    s_last = atomicAdd(p.counter + b, 1u) == (unsigned)(p.nchunk - 1);
  }
  __syncthreads();
  if (!s_last) return;

  // The last block of image b combines the chunks. Chunk count and sizes depend on the image's shape only (host:
  // aim_rt/vq_fast.py stats_chunking), and the combine order is fixed, so an image's statistics are the same bits
  // whether it is decoded alone or in a batch. Thread (lane = t / G, group g = t % G) merges chunks lane, lane + L,
  // ... in order, COMBINE_BATCH loads in flight at a time (a warp reads 32 consecutive groups: 256 contiguous
  // bytes per chunk); then the L lane results of each group are merged in lane order.
  __threadfence();
  const int L = blockDim.x / G;
  float n = 0.0f, mean = 0.0f, m2 = 0.0f;
  if (part < L) {
    const float2* pb = reinterpret_cast<const float2*>(p.partial) + (size_t)b * p.nchunk * G + g;
    for (int k0 = part; k0 < p.nchunk; k0 += L * COMBINE_BATCH) {
      float2 v[COMBINE_BATCH];
#pragma unroll
      for (int u = 0; u < COMBINE_BATCH; ++u) {
        const int k = k0 + u * L;
        if (k < p.nchunk) v[u] = __ldcg(pb + (size_t)k * G);  // L2: other blocks wrote them
      }
#pragma unroll
      for (int u = 0; u < COMBINE_BATCH; ++u) {
        const int k = k0 + u * L;
        if (k >= p.nchunk) break;
        long long rows = p.hw - (long long)k * p.rows_per_chunk;  // > 0: nchunk = ceil(hw / rows_per_chunk)
        if (rows > p.rows_per_chunk) rows = p.rows_per_chunk;
        chan_merge(n, mean, m2, (float)(rows * cg), v[u].x, v[u].y);
      }
    }
  }
  f_n[t] = n;
  f_mean[t] = mean;
  f_m2[t] = m2;
  __syncthreads();
  if (t < G) {
    n = f_n[t];
    mean = f_mean[t];
    m2 = f_m2[t];
    for (int k = 1; k < L; ++k) chan_merge(n, mean, m2, f_n[k * G + t], f_mean[k * G + t], f_m2[k * G + t]);
    f_mean[t] = mean;
    f_m2[t] = 1.0f / sqrtf(m2 / n + p.eps);  // rstd of group t
  }
  __syncthreads();
  for (int ch = t; ch < p.c; ch += blockDim.x) {  // all threads write the per-channel scale and shift
    const int gg = ch / cg;
    const float a = f_m2[gg] * p.gamma[ch];
    float sh = p.beta[ch] - f_mean[gg] * a;
    if (p.fold) sh += p.fold[ch] * a;
    p.scale[b * p.c + ch] = a;
    p.shift[b * p.c + ch] = sh;
  }
  if (t == 0) p.counter[b] = 0;  // ready for the next launch (graph replays included)
}

// ----- normalize (+ SiLU) -----------------------------------------------------------------------------------
struct GnApplyParams {
  const elem_t* x;     // (B, hw, c)
  const float* scale;  // (B, c)
  const float* shift;  // (B, c)
  elem_t* out;         // (B, hw, c), not aliasing x
  long long per_image; // hw * c / 8 vectors
  int c, silu;
};

// grid (tiles, B): each block covers blockDim * VEC_BATCH consecutive vectors of one image; the block size is a
// multiple of cv, so each thread keeps one channel vector and its scale/shift in registers.
extern "C" __global__ void __launch_bounds__(256) vq_gn_apply(GnApplyParams p) {
  const int cv = p.c >> 3;
  const int vi = threadIdx.x % cv;
  const long long b = blockIdx.y;
  float a[8], s[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    a[k] = p.scale[b * p.c + vi * 8 + k];
    s[k] = p.shift[b * p.c + vi * 8 + k];
  }
  const uint4* __restrict__ x = reinterpret_cast<const uint4*>(p.x) + b * p.per_image;
  uint4* __restrict__ out = reinterpret_cast<uint4*>(p.out) + b * p.per_image;
  const long long j0 = (long long)blockIdx.x * blockDim.x * VEC_BATCH + threadIdx.x;
  uint4 v[VEC_BATCH];
#pragma unroll
  for (int u = 0; u < VEC_BATCH; ++u)
    if (j0 + u * blockDim.x < p.per_image) v[u] = x[j0 + u * blockDim.x];
#pragma unroll
  for (int u = 0; u < VEC_BATCH; ++u) {
    if (j0 + u * blockDim.x >= p.per_image) continue;
    float f[8];
    unpack8(v[u], f);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float y = f[k] * a[k] + s[k];
      f[k] = p.silu ? silu(y) : y;
    }
    out[j0 + u * blockDim.x] = pack8(f);
  }
}

// ----- nearest 2x upsample (the path without the subpixel fold) ----------------------------------------------
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

// ----- norm_out + SiLU + conv_out (3x3, <= 8 outputs) + bias -> float32 NCHW --------------------------------
// cuDNN runs this conv at L2 speed (its im2col tiles re-read the input 9x for 8 useful output columns) after a
// separate normalize pass; here a block normalizes a (4+2) x (32+2) input tile once into shared memory and runs
// m16n8k16 tensor-core MMAs over the 9 taps. Blocks are persistent (one wave, weights loaded once) and load the
// next tile into registers while their MMAs run. Pixel rows in shared memory are padded by 8 elements, so the
// 32-bit fragment loads of 8 consecutive pixels hit 8 distinct 4-bank sets.
#define CO_TH 4
#define CO_TW 32
#define CO_PF 13  // vectors per thread in flight: a tile has (CO_TH+2)(CO_TW+2) C/8 <= 256 CO_PF (host checks)
struct ConvOutParams {
  const elem_t* x;      // (B, h, w, c)
  const float* scale;   // (B, c)
  const float* shift;   // (B, c)
  const elem_t* wt;     // (8, 9, c): [out channel][tap ky*3+kx][in channel], zero past out_ch
  const float* bias;    // (out_ch)
  float* out;           // (B, out_ch, h, w)
  int h, w, c, out_ch, tiles_x, tiles_y, ntiles;
};

// tiles in (image, row, column) order, columns fastest: neighbouring blocks share halos in L2
__device__ __forceinline__ void co_tile(const ConvOutParams& p, int tile, long long& b, int& y0, int& x0) {
  const int tx = tile % p.tiles_x, r = tile / p.tiles_x;
  y0 = (r % p.tiles_y) * CO_TH;
  x0 = tx * CO_TW;
  b = r / p.tiles_y;
}

// block 256 (blockDim % (c/8) == 0: each thread keeps one channel vector), grid <= tiles
extern "C" __global__ void __launch_bounds__(256, 2) vq_conv_out(ConvOutParams p) {
#if __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int C = p.c, cs = C + 8, ks = 9 * C + 8, tw2 = CO_TW + 2, cv = C >> 3;
  elem_t* tile = reinterpret_cast<elem_t*>(smem_raw);   // (CO_TH+2) * tw2 pixels x cs
  elem_t* wsm = tile + (CO_TH + 2) * tw2 * cs;            // 8 x ks
  const int t = threadIdx.x;
  const int kv = (9 * C) >> 3;
  for (int i = t; i < 8 * kv; i += blockDim.x) {
    const int n = i / kv, k = i - n * kv;
    *reinterpret_cast<uint4*>(wsm + n * ks + k * 8) = reinterpret_cast<const uint4*>(p.wt)[i];
  }
  const int total = (CO_TH + 2) * tw2 * cv;
  const int vi = t % cv, pix0 = t / cv, ppu = blockDim.x / cv;  // vector t + u*blockDim is pixel pix0 + u*ppu
  uint4 raw[CO_PF];
  long long b;
  int y0, x0;
  int tl = blockIdx.x;
  co_tile(p, tl, b, y0, x0);
#pragma unroll
  for (int u = 0; u < CO_PF; ++u) {
    const int pix = pix0 + u * ppu;
    const int gy = y0 - 1 + pix / tw2, gx = x0 - 1 + pix % tw2;
    raw[u] = make_uint4(0u, 0u, 0u, 0u);
    if (t + u * (int)blockDim.x < total && gy >= 0 && gy < p.h && gx >= 0 && gx < p.w)
      raw[u] = *reinterpret_cast<const uint4*>(p.x + ((b * p.h + gy) * p.w + gx) * C + vi * 8);
  }
  const int warp = t >> 5, lane = t & 31, gid = lane >> 2, tig = lane & 3;
  const int ty = warp >> 1, tx = (warp & 1) * 16;  // warp w: tile row w/2, columns (w%2)*16 .. +16
  const unsigned* T32 = reinterpret_cast<const unsigned*>(tile);
  const unsigned* W32 = reinterpret_cast<const unsigned*>(wsm);
  for (; tl < p.ntiles; tl += gridDim.x) {
    co_tile(p, tl, b, y0, x0);
    float a[8], s[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      a[k] = p.scale[b * C + vi * 8 + k];
      s[k] = p.shift[b * C + vi * 8 + k];
    }
    __syncthreads();  // the previous tile's MMAs are done with the buffer (first time: the weights are stored)
#pragma unroll
    for (int u = 0; u < CO_PF; ++u) {
      if (t + u * (int)blockDim.x >= total) continue;
      const int pix = pix0 + u * ppu;
      const int gy = y0 - 1 + pix / tw2, gx = x0 - 1 + pix % tw2;
      uint4 r = make_uint4(0u, 0u, 0u, 0u);  // the conv's zero padding is of the activated tensor
      if (gy >= 0 && gy < p.h && gx >= 0 && gx < p.w) {
        float f[8];
        unpack8(raw[u], f);
#pragma unroll
        for (int k = 0; k < 8; ++k) f[k] = silu(f[k] * a[k] + s[k]);
        r = pack8(f);  // rounded as the unfused path's apply pass rounds
      }
      *reinterpret_cast<uint4*>(tile + pix * cs + vi * 8) = r;
    }
    __syncthreads();
    const int next = tl + gridDim.x;
    if (next < p.ntiles) {  // the next tile's loads, in flight during this tile's MMAs
      long long nb;
      int ny0, nx0;
      co_tile(p, next, nb, ny0, nx0);
#pragma unroll
      for (int u = 0; u < CO_PF; ++u) {
        const int pix = pix0 + u * ppu;
        const int gy = ny0 - 1 + pix / tw2, gx = nx0 - 1 + pix % tw2;
        if (t + u * (int)blockDim.x < total && gy >= 0 && gy < p.h && gx >= 0 && gx < p.w)
          raw[u] = *reinterpret_cast<const uint4*>(p.x + ((nb * p.h + gy) * p.w + gx) * C + vi * 8);
      }
    }
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int tap = 0; tap < 9; ++tap) {
      const int ky = tap / 3, kx = tap - ky * 3;
      const int pa = (ty + ky) * tw2 + tx + gid + kx;  // input pixel of A row gid; row gid+8 is 8 pixels on
      const unsigned* ra = T32 + ((pa * cs) >> 1) + tig;
      const unsigned* rb = T32 + (((pa + 8) * cs) >> 1) + tig;
      const unsigned* wr = W32 + ((gid * ks + tap * C) >> 1) + tig;
      for (int kc = 0; kc < (C >> 1); kc += 8) {
        const unsigned a0 = ra[kc], a1 = rb[kc], a2 = ra[kc + 4], a3 = rb[kc + 4];
        const unsigned b0 = wr[kc], b1 = wr[kc + 4];
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
      }
    }
    const int oy = y0 + ty;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = tig * 2 + (i & 1);
      const int ox = x0 + tx + gid + (i >= 2 ? 8 : 0);
      if (n < p.out_ch && oy < p.h && ox < p.w)
        p.out[((b * p.out_ch + n) * p.h + oy) * (long long)p.w + ox] = d[i] + p.bias[n];
    }
  }
#endif
}
