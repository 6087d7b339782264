// aim-rt decode-step kernels: the one CUDA source behind the native runtime and the TensorRT plugin.
//
// Compiled per element type with -DELEM_KIND=0 (float32), 1 (float16) or 2 (bfloat16); no CUDA headers are
// needed (16-bit conversions are single PTX instructions), so NVRTC compiles it anywhere. Every entry point
// takes one plain parameter struct (mirrored field for field in plugins/kernels.py); pointers to "in" and
// "out" state may be equal (in place) or differ (ping-pong). All arithmetic is float32.
//
//   aim_selective_state_update   one Mamba2 decode step between in_proj and out_proj for every row and head:
//                           conv window shift + depthwise conv + SiLU, dt softplus, h = h*exp(dt*A) + dt*x*B,
//                           y = h.C + D*x, g = y*silu(z); writes g*norm_w and each head's sum of g^2.
//   aim_ssu_warps           the same for the AiM shape with every warp on its own slices (many rows; same bits).
//   aim_gated_norm_apply    divides that output by its group's RMS and shifts the B/C conv windows (where the
//                           next kernel cannot: ConvShift).
//   aim_residual_norm       residual += gate*out (or = input; out optionally scaled by the previous mixer's
//                           1/rms), RMSNorm, optional second RMSNorm, modulate.
//   aim_cfg_sample          CFG mix / temperature, top-k, top-p, inverse-CDF draw from a counter-based hash of
//                           (image seed, token index); writes the token and the next step's input embedding.
//   aim_advance             token index += 1 (device counter read by the sampler).

#ifndef ELEM_KIND
#define ELEM_KIND 2
#endif

#if ELEM_KIND == 0
typedef float elem_t;
__device__ __forceinline__ float ld(elem_t v) { return v; }
__device__ __forceinline__ elem_t st(float f) { return f; }
#elif ELEM_KIND == 1
typedef unsigned short elem_t;
__device__ __forceinline__ float ld(elem_t v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f; }
__device__ __forceinline__ elem_t st(float f) { elem_t v; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f)); return v; }
#else
typedef unsigned short elem_t;
__device__ __forceinline__ float ld(elem_t v) { return __uint_as_float(((unsigned)v) << 16); }
__device__ __forceinline__ elem_t st(float f) { elem_t v; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f)); return v; }
#endif

// Programmatic dependent launch (Hopper, sm_90+): a kernel launched with the PDL attribute may start while its
// predecessor in the stream still runs. PDL_WAIT blocks until the predecessor has finished and its writes are
// visible. Every kernel calls PDL_WAIT, so each kernel's completion implies that of all earlier ones; what a
// kernel does before it may read only what no earlier kernel of the step writes (weights, modulations, its own
// layer's recurrent state, last written a step ago) and must write nothing.
// When the next kernel may launch: for up to PDL_EARLY_ROWS rows, at once (PDL_START, first thing in every
// kernel): its blocks take their place and fetch their weights while this kernel still waits or runs, and the
// one after it can do the same, as far as the SMs have room (a grid launches only once all of its
// predecessor's blocks are resident, so the chain cannot deadlock). Above it, when this kernel passes
// PDL_WAIT: one kernel ahead at most. Measured on the H200 (bench/results/step_variants_*_v8_pdl.txt, each
// twice): launching at once gains 14-16 % per step at AiM-B batch 1, 6 % at batch 4 and 3 % at batch 16, 6 % at
// AiM-XL batch 1; it loses 0.7 % at AiM-XL batch 4 and 4 % at batch 16 (its early grids crowd the state update),
// and is neutral at batch 64. Hence at once up to batch 4. On sm_80 both are no-ops: plain launches.
// Each kind of kernel has its own limit (PDL_EARLY_<KIND>, default PDL_EARLY_ROWS): the limit of kernel K decides
// when K + 1 may launch, so e.g. the products can let the state update take its place and request its state
// early at any batch while the state update keeps its successor out (to measure per kind).
#ifndef PDL_EARLY_ROWS
#define PDL_EARLY_ROWS 8
#endif
#ifndef PDL_EARLY_NORM
#define PDL_EARLY_NORM PDL_EARLY_ROWS   // aim_residual_norm, aim_gated_norm_apply
#endif
#ifndef PDL_EARLY_GEMV
#define PDL_EARLY_GEMV PDL_EARLY_ROWS   // aim_gemv_*
#endif
#ifndef PDL_EARLY_FOLD
#define PDL_EARLY_FOLD PDL_EARLY_GEMV   // the products with the residual add folded in (out_proj: the next norm)
#endif
#ifndef PDL_EARLY_SSU
#define PDL_EARLY_SSU PDL_EARLY_ROWS    // aim_selective_state_update, aim_ssu_warps
#endif
#ifndef PDL_EARLY_SAMPLE
#define PDL_EARLY_SAMPLE PDL_EARLY_ROWS // aim_cfg_sample
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_LAUNCH_NEXT() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#define PDL_START(rows, limit) do { if ((rows) <= (limit)) PDL_LAUNCH_NEXT(); } while (0)
#define PDL_WAIT(rows, limit)                                   \
  do {                                                          \
    asm volatile("griddepcontrol.wait;" ::: "memory");          \
    if ((rows) > (limit)) PDL_LAUNCH_NEXT();                    \
  } while (0)
#else
#define PDL_START(rows, limit) do { } while (0)
#define PDL_WAIT(rows, limit) do { } while (0)
#endif

// AIM_PARTS selects the entry points a build emits, a sum of: 1 the step (state update, norms, products), 2 the
// sampler, 4 the state update's warp kernel (aim_ssu_warps: the AiM shape, so model-independent like the sampler).
// The host compiles the three as programs at once (a cold start waits for the longest only).
#ifndef AIM_PARTS
#define AIM_PARTS 7
#endif

#define VEC 8  // state elements per thread per access: 16 bytes for 16-bit types, 32 for float32

struct __align__(16) Vec8 { elem_t v[VEC]; };  // aligned: one 16-byte access (two for float32)

__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }
__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : log1pf(__expf(x)); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// Block-wide sum for blockDim.x a multiple of 32 (<= 1024); `scratch` holds 32 floats.
__device__ float block_sum(float v, float* scratch) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.0f;
  return warp_sum(v);
}

// ----------------------------------------------------------------------------------------------------------
struct SsuParams {
  const elem_t* xbc;  long long xbc_stride;   // (rows, conv_dim) view: x | B | C before the conv
  const elem_t* z;    long long z_stride;     // (rows, d_inner)
  const elem_t* dt;   long long dt_stride;    // (rows, nheads), before softplus
  const elem_t* conv_state_in;  elem_t* conv_state_out;  // (rows, conv_dim, d_conv) contiguous
  const elem_t* ssm_state_in;   elem_t* ssm_state_out;   // (rows, nheads, headdim, d_state) contiguous
  const elem_t* conv_w;   // (conv_dim, d_conv)
  const elem_t* conv_b;   // (conv_dim)
  const elem_t* dt_bias;  // (nheads)
  const elem_t* A_log;    // (nheads)
  const elem_t* D;        // (nheads)
  const elem_t* norm_w;   // (d_inner)
  float* sumsq;           // out (rows, nheads): each head's sum of squares of g = y * silu(z)
  elem_t* y;  long long y_stride;  // out (rows, d_inner): g * norm_w, not yet divided by the group's RMS
  int rows, d_inner, conv_dim, nheads, headdim, d_state, ngroups, d_conv;
  float eps;
};

#define MAX_W 4       // d_conv <= MAX_W

// grid (G): G <= rows * nheads blocks, each owning a contiguous run of (row, head) slices, s = row * nheads +
// head; block SSU_THREADS; dynamic shared memory: a ring of SSU_STAGES stages (ssu_smem_bytes in kernels.py).
// Every state slice is streamed exactly once.
// Why this shape (H200, bench/results/ssu3_*): one block per slice kept too few bytes in flight (each block
// loaded its 16 KB, then spent most of its life on round trips and its own compute). Here a fixed set of
// resident blocks streams the slices through a ring in shared memory, filled by cp.async: a stage holds a
// slice's state and the conv windows it reads (its head's x channels; the group's B/C when the (row, group)
// changes). A block's first SSU_STAGES stages are requested before PDL_WAIT (while in_proj runs) and each
// stage is refilled, SSU_STAGES slices ahead, as soon as it is consumed, so no DRAM round trip is left on a
// slice's path: after the first one, only in_proj's outputs (L2) and the weights (L1/L2) are read directly.
// Each thread copies exactly the bytes it later reads, so its own cp.async.wait_group makes them visible: no
// barrier guards the ring. One __syncthreads per slice (the conv results, double-buffered by slice parity).
// Instructions per state element are kept few (ncu showed the first version of this loop issue-bound): bf16
// pairs unpacked with one integer op each and packed by one cvt per pair, no division in the loops (the slice
// cursor is advanced, not divided), dt and exp(dt * A) computed once per slice by one thread, and the AiM
// shape compiled with constants (SSU_FAST): 4.6k warp-instructions per slice at AiM-XL b64 against 7.7k before
// (ncu, bench/results/ncu_ssu4_h200_2026-11-29.txt).
// Consecutive slices of one (row, group) share B and C, which stay in registers.
// Two things span the heads of a group and are left to the next kernel, which runs after every head is done:
// the gated RMSNorm (each slice writes its head's sum of squares and g * norm_w; the consumer applies 1/rms —
// aim_residual_norm when ngroups == 1, where it factors out of out_proj, else aim_gated_norm_apply) and the
// shift of the group's B/C conv windows, which every head reads (ConvShift, done by the same consumer).
// The arithmetic of a slice is the same, in the same order, whatever block runs it: deterministic and
// independent of the batch composition.
#ifndef SSU_THREADS
#define SSU_THREADS 256
#endif
// Measured on the H200 (scripts/ssu_bench.py, bench/results/ssu3_h200_2026-11-29_run2.*, ssu4_h200_2026-11-29.*):
// 3 resident blocks of 256 threads (80 registers, no spill) beat 4 (64 registers, 72 bytes spilled, whose
// reloads sit on a slice's path) everywhere (ssu4: AiM-B b16 9.5 vs 12.0 us, AiM-XL b64 68.2 vs 74.1 us); 3
// stages tie with 2 (AiM-XL b64 66.9 vs 68.2 us, b16 18.5 vs 18.1). SSU_MIN_BLOCKS only changes register
// allocation (same PTX).
#ifndef SSU_MIN_BLOCKS
#define SSU_MIN_BLOCKS 3
#endif
#ifndef SSU_STAGES
#define SSU_STAGES 2
#endif
#ifndef SSU_STORE_CS
#define SSU_STORE_CS 0  // 1: the state is written with st.global.cs (evict first)
#endif
#define MAX_ITERS (1024 / SSU_THREADS)  // state chunks per thread per slice: headdim * d_state <= 8192
#define SSU_BC ((256 + SSU_THREADS - 1) / SSU_THREADS)  // B/C channels per thread: 2 * d_state <= 256
#define SSU_WARPS (SSU_THREADS / 32)
#define WORDS8 (VEC * (int)sizeof(elem_t) / 4)  // 32-bit words in VEC state elements


__device__ __forceinline__ unsigned smem_addr(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
// cp.async (sm_80+): global → shared without registers. 16 bytes bypass L1 (the state is read once).
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}
// One conv window (W elements) into shared memory: one cp.async where its size allows, else plain copies
// (then it is complete at once). Callers keep src and dst aligned to the window's size (host-checked).
__device__ __forceinline__ void copy_window(elem_t* dst, const elem_t* src, int W) {
  const int bytes = W * (int)sizeof(elem_t);
  const unsigned d = smem_addr(dst);
  if (bytes == 16) asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" :: "r"(d), "l"(src) : "memory");
  else if (bytes == 8) asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" :: "r"(d), "l"(src) : "memory");
  else if (bytes == 4) asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(d), "l"(src) : "memory");
  else for (int w = 0; w < W; ++w) dst[w] = src[w];
}
__device__ __forceinline__ void load8(const elem_t* src, unsigned (&u)[WORDS8]) {  // 16-byte aligned
#pragma unroll
  for (int q = 0; q < WORDS8 / 4; ++q) {
    const uint4 t = reinterpret_cast<const uint4*>(src)[q];
    u[4 * q] = t.x; u[4 * q + 1] = t.y; u[4 * q + 2] = t.z; u[4 * q + 3] = t.w;
  }
}
__device__ __forceinline__ void unpack8(const unsigned (&u)[WORDS8], float (&f)[VEC]) {
#pragma unroll
  for (int q = 0; q < WORDS8; ++q) {
#if ELEM_KIND == 0
    f[q] = __uint_as_float(u[q]);
#elif ELEM_KIND == 1
    f[2 * q] = ld((elem_t)(u[q] & 0xFFFFu));
    f[2 * q + 1] = ld((elem_t)(u[q] >> 16));
#else
    f[2 * q] = __uint_as_float(u[q] << 16);  // little endian: the lower half is the first element
    f[2 * q + 1] = __uint_as_float(u[q] & 0xFFFF0000u);
#endif
  }
}
#if ELEM_KIND != 0
// Two values rounded to the 16-bit type in one 32-bit word, `lo` first in memory: one cvt rounds both, as two
// cvt.rn.{f16,bf16}.f32 would.
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  unsigned u;
#if ELEM_KIND == 1
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(u) : "f"(hi), "f"(lo));
#else
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(u) : "f"(hi), "f"(lo));
#endif
  return u;
}
#endif
__device__ __forceinline__ void pack8(const float (&f)[VEC], unsigned (&u)[WORDS8]) {
#pragma unroll
  for (int q = 0; q < WORDS8; ++q) {
#if ELEM_KIND == 0
    u[q] = __float_as_uint(f[q]);
#else
    u[q] = pack2(f[2 * q], f[2 * q + 1]);
#endif
  }
}
__device__ __forceinline__ void store8(elem_t* dst, const unsigned (&u)[WORDS8]) {
#pragma unroll
  for (int q = 0; q < WORDS8 / 4; ++q) {
#if SSU_STORE_CS
    asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" :: "l"(dst + q * 16 / sizeof(elem_t)),
                 "r"(u[4 * q]), "r"(u[4 * q + 1]), "r"(u[4 * q + 2]), "r"(u[4 * q + 3]) : "memory");
#else
    reinterpret_cast<uint4*>(dst)[q] = make_uint4(u[4 * q], u[4 * q + 1], u[4 * q + 2], u[4 * q + 3]);
#endif
  }
}

// The arithmetic of the state update, shared by its two kernels so that both give the same bits. Every
// contraction is spelled out (the same rounding whatever the compiler fuses).
// One conv tap: acc + v * w.
__device__ __forceinline__ float conv_tap(float acc, float v, float w) { return __fmaf_rn(v, w, acc); }
// dt = softplus(raw + bias) and dA = exp(-dt * exp(A_log)), once per slice.
__device__ __forceinline__ void ssu_dt(float raw, float bias, float A_log, float& dt, float& dA) {
  dt = softplus(raw + bias);
  dA = __expf(-dt * __expf(A_log));
}
// VEC state elements of one state row: h = h * dA + dtx * B (dtx = dt * x), stored rounded; returns their part
// of y = h . C, summed in column order.
__device__ __forceinline__ float ssu_chunk(const elem_t* src, elem_t* dst, float dtx, float dA,
                                           const float (&bq)[VEC], const float (&cq)[VEC]) {
  unsigned raw[WORDS8];
  float hv[VEC];
  load8(src, raw);
  unpack8(raw, hv);
  float acc = 0.0f;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    hv[j] = __fmaf_rn(dtx, bq[j], __fmul_rn(hv[j], dA));
    acc = __fmaf_rn(hv[j], cq[j], acc);
  }
  pack8(hv, raw);
  store8(dst, raw);
  return acc;
}
// A state row's gated output g = (h . C + D * x) * silu(z), and g^2 added to a sum of squares.
__device__ __forceinline__ float ssu_gated(float acc, float Dh, float xv, float zv) {
  return __fmul_rn(__fmaf_rn(Dh, xv, acc), zv);
}
__device__ __forceinline__ float sq_add(float s, float g) { return __fmaf_rn(g, g, s); }

struct SsuRing {  // the shape of one stage: state (P * N), then x windows (P * W), then B/C windows (2N * W)
  int PN, xwin, bcwin, len;  // element offsets and the stage length (rounded to 16 bytes)
};
// Where a slice s = row * nheads + head is: its row, head, group and head within the group. Divided out once
// per block (init) and then advanced one slice at a time, so no division is left on a slice's path. Slice s
// starts a new (row, group), whose B and C differ from slice s - 1's, exactly when hg == 0.
struct SsuCursor {
  int r, h, grp, hg;
  __device__ __forceinline__ void init(int s, int H, int hpg) {
    r = s / H; h = s - r * H; grp = h / hpg; hg = h - grp * hpg;
  }
  __device__ __forceinline__ void advance(int H, int hpg) {
    ++h; ++hg;
    if (hg == hpg) { hg = 0; ++grp; }
    if (h == H) { h = 0; grp = 0; ++r; }
  }
};
// The state update's body for one shape: KP, KN, KW (headdim, d_state, d_conv) are compile-time constants, or 0
// where they are read from p at run time. The kernel runs the instance of the AiM models' shape (64, 128, 4)
// when it applies, else the generic one: same arithmetic, in the same order (bit-identical outputs); the
// constant shape only removes address arithmetic and uniform branches, and lets the row sums of the state loop
// be reduced for all of a thread's chunks at once (ssu_row_sums).
#define SSU_FAST_P 64
#define SSU_FAST_N 128
#define SSU_FAST_W 4
#ifndef SSU_FAST
#define SSU_FAST 1  // 0: the generic instance only (to measure what the constant shape gains)
#endif
#ifndef SSU_GENERIC
#define SSU_GENERIC 1  // 0: no generic instance (a build for the AiM shape only). Measured, not used:
#endif                 // AiM-B b1 -2.4 % but b64 +4 %, AiM-XL b64 +5 % per step (lean_h200_2026-11-29_*)

// Request slice s (at cursor c) into `stage`: this thread's state chunks, its x channel's window, and
// (new_bc) its B/C channel's window; the same bytes it reads when it computes slice s.
template <int KP, int KN, int KW>
__device__ __forceinline__ void ssu_fetch(const SsuParams& p, const SsuRing& g, elem_t* stage, int s,
                                          const SsuCursor& c, bool new_bc) {
  const int tid = threadIdx.x, P = KP ? KP : p.headdim, N = KN ? KN : p.d_state, W = KW ? KW : p.d_conv;
  const elem_t* src = p.ssm_state_in + (long long)s * g.PN;
#pragma unroll
  for (int it = 0; it < MAX_ITERS; ++it) {
    const int e = (it * SSU_THREADS + tid) * VEC;
    if (e < g.PN)
#pragma unroll
      for (int q = 0; q < WORDS8 / 4; ++q)
        cp_async16(stage + e + q * 16 / sizeof(elem_t), src + e + q * 16 / sizeof(elem_t));
  }
  const elem_t* conv = p.conv_state_in + (long long)c.r * p.conv_dim * W;
  if (tid < P) copy_window(stage + g.xwin + tid * W, conv + (c.h * P + tid) * W, W);
  if (new_bc) {
#pragma unroll
    for (int j = 0; j < SSU_BC; ++j) {
      const int ch = tid + j * SSU_THREADS;  // 0..N-1: the group's B; N..2N-1: its C
      if (ch >= 2 * N) break;
      const int chn = ch < N ? p.d_inner + c.grp * N + ch : p.d_inner + p.ngroups * N + c.grp * N + (ch - N);
      copy_window(stage + g.bcwin + ch * W, conv + chn * W, W);
    }
  }
}

// The thread that computes a slice's dt, exp(dt * A) and D (once per slice, shared through shared memory):
// lane 0 of the last warp, which has no x channel when headdim <= SSU_THREADS - 32.
#define SSU_DT_TID (SSU_THREADS - 32)

// Row sums of the fast shape (16 lanes per state row, 4 chunks per thread): the same butterfly over the row's
// lanes as the generic loop (pairs differing in lane bit 3, then 2, 1, 0; each sum a + b is b + a, so every
// lane's value is the generic one), but exchanging half of the chunks at the first two levels: 5 shuffles
// instead of 16. Returns the sum of chunk 2 * bit3 + bit2 of the lane's row.
__device__ __forceinline__ float ssu_row_sums(const float (&a)[4], int lane) {
  const bool b3 = lane & 8, b2 = lane & 4;
  float k0 = b3 ? a[2] : a[0], k1 = b3 ? a[3] : a[1];  // the chunks this lane keeps
  const float s0 = b3 ? a[0] : a[2], s1 = b3 ? a[1] : a[3];  // those its partner keeps
  k0 += __shfl_xor_sync(0xffffffffu, s0, 8);
  k1 += __shfl_xor_sync(0xffffffffu, s1, 8);
  float k = b2 ? k1 : k0;
  k += __shfl_xor_sync(0xffffffffu, b2 ? k0 : k1, 4);
  k += __shfl_xor_sync(0xffffffffu, k, 2);
  k += __shfl_xor_sync(0xffffffffu, k, 1);
  return k;
}

template <int KP, int KN, int KW>
__device__ __forceinline__ void ssu_body(const SsuParams& p, float (*s_red)[SSU_WARPS], float (*s_dt)[3]) {
  extern __shared__ __align__(16) unsigned char ssu_smem[];
  // the fast reduction: 16 lanes per row, 4 chunks per thread
  constexpr bool FAST = KN * KP == 4 * SSU_THREADS * VEC && KN == 16 * VEC;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int P = KP ? KP : p.headdim, N = KN ? KN : p.d_state, W = KW ? KW : p.d_conv;
  const int H = p.nheads, hpg = p.nheads / p.ngroups;
  SsuRing g;
  g.PN = P * N;  // a multiple of 32 * VEC (host-checked): a warp's lanes are all in or all out
  g.xwin = g.PN;
  g.bcwin = g.xwin + P * W;
  g.len = (g.bcwin + 2 * N * W + 16 / (int)sizeof(elem_t) - 1) / (16 / (int)sizeof(elem_t)) * (16 / (int)sizeof(elem_t));
  const int total = p.rows * H;
  const int s0 = (int)((long long)blockIdx.x * total / gridDim.x);
  const int n = (int)((long long)(blockIdx.x + 1) * total / gridDim.x) - s0;  // >= 1: gridDim.x <= total
  elem_t* ring = reinterpret_cast<elem_t*>(ssu_smem);
  float* conv_buf = reinterpret_cast<float*>(ring + SSU_STAGES * g.len);  // 2 x {x, silu(z), norm_w, B, C}
  const int conv_len = 3 * P + 2 * N;

  // ---- the first SSU_STAGES slices: this layer's own state, last written by this kernel one step ago, so
  // requested before PDL_WAIT. One commit group per slice (empty past the run) keeps the count uniform.
  // `fc` is the cursor of the next slice to request, `cur` that of the slice computed.
  SsuCursor cur, fc;
  cur.init(s0, H, hpg);
  fc = cur;
#pragma unroll
  for (int k = 0; k < SSU_STAGES; ++k) {
    if (k < n) ssu_fetch<KP, KN, KW>(p, g, ring + k * g.len, s0 + k, fc, k == 0 || fc.hg == 0);
    cp_async_commit();
    fc.advance(H, hpg);
  }

  // Thread layout of a state slice ((P, N) row-major): VEC contiguous elements per chunk, N / VEC lanes per row
  // p; chunk `it` of thread tid starts at (it * SSU_THREADS + tid) * VEC, in row row0 + it * rows_per_it. Its
  // columns n0..n0+VEC-1 are the same in every chunk (SSU_THREADS * VEC is a multiple of N, as N divides 256),
  // so its B and C live in registers, reloaded only when the (row, group) changes.
  const int n0 = (tid * VEC) % N, row0 = tid * VEC / N, rows_per_it = SSU_THREADS * VEC / N;
  const int lanes_per_row = N / VEC;
  float bq[VEC], cq[VEC];
  int slot = 0;  // i % SSU_STAGES
  for (int i = 0; i < n; ++i) {
    const int s = s0 + i, r = cur.r, h = cur.h, grp = cur.grp;
    const bool new_bc = i == 0 || cur.hg == 0;  // uniform across the block
    elem_t* stage = ring + slot * g.len;
    float* xs = conv_buf + (i & 1) * conv_len;  // this head's x after the conv
    float* zs = xs + P;                         // silu(z)
    float* ws = zs + P;                         // norm_w
    float* Bs = ws + P;                         // the group's B after the conv
    float* Cs = Bs + N;                         // the group's C
    float* sd = s_dt[i & 1];

    // ---- 1. weights (for the first slice, before PDL_WAIT)
    const int xch = h * P + tid;  // this thread's x channel (tid < P)
    float xcw[MAX_W - 1], xlast = 0.0f, xcb = 0.0f, nw = 0.0f;  // taps on the kept window; the new input's tap
    if (tid < P) {
#pragma unroll
      for (int w = 0; w < MAX_W - 1; ++w) xcw[w] = w < W - 1 ? ld(p.conv_w[xch * W + w]) : 0.0f;
      xlast = ld(p.conv_w[xch * W + W - 1]);
      xcb = ld(p.conv_b[xch]);
      nw = ld(p.norm_w[xch]);
    }
    float bcw[SSU_BC][MAX_W - 1], blast[SSU_BC], bcb[SSU_BC];
    int bch[SSU_BC];
#pragma unroll
    for (int j = 0; j < SSU_BC; ++j) {
      const int c = tid + j * SSU_THREADS;
      bch[j] = !new_bc || c >= 2 * N ? -1
             : c < N ? p.d_inner + grp * N + c : p.d_inner + p.ngroups * N + grp * N + (c - N);
      if (bch[j] < 0) continue;
#pragma unroll
      for (int w = 0; w < MAX_W - 1; ++w) bcw[j][w] = w < W - 1 ? ld(p.conv_w[bch[j] * W + w]) : 0.0f;
      blast[j] = ld(p.conv_w[bch[j] * W + W - 1]);
      bcb[j] = ld(p.conv_b[bch[j]]);
    }
    float dt_bias = 0.0f, A_log = 0.0f;
    if (tid == SSU_DT_TID) {
      dt_bias = ld(p.dt_bias[h]);
      A_log = ld(p.A_log[h]);
      sd[2] = ld(p.D[h]);
    }
    if (i == 0) PDL_WAIT(p.rows, PDL_EARLY_SSU);

    // ---- 2. in_proj's outputs for this slice (L2)
    const elem_t* xbc = p.xbc + (long long)r * p.xbc_stride;
    const elem_t xin = tid < P ? xbc[xch] : elem_t(0);
    const float zv = tid < P ? ld(p.z[(long long)r * p.z_stride + xch]) : 0.0f;
    float bin[SSU_BC];
#pragma unroll
    for (int j = 0; j < SSU_BC; ++j) bin[j] = bch[j] >= 0 ? ld(xbc[bch[j]]) : 0.0f;
    if (tid == SSU_DT_TID) {
      ssu_dt(ld(p.dt[(long long)r * p.dt_stride + h]), dt_bias, A_log, sd[0], sd[1]);
    }

    // ---- 3. this thread's part of slice i has landed: conv + SiLU (window shifted left, new input last,
    // summed in window order) into shared memory; this head's x windows written back
    cp_async_wait<SSU_STAGES - 1>();
    if (tid < P) {
      const elem_t* win = stage + g.xwin + tid * W;
      elem_t* sout = p.conv_state_out + ((long long)r * p.conv_dim + xch) * W;
      float acc = xcb;
#pragma unroll
      for (int w = 0; w < MAX_W - 1; ++w)
        if (w < W - 1) { const elem_t v = win[w + 1]; acc = conv_tap(acc, ld(v), xcw[w]); sout[w] = v; }
      acc = conv_tap(acc, ld(xin), xlast);
      sout[W - 1] = xin;
      xs[tid] = silu(acc);
      zs[tid] = silu(zv);
      ws[tid] = nw;
    }
#pragma unroll
    for (int j = 0; j < SSU_BC; ++j) {
      if (bch[j] < 0) continue;
      const int c = tid + j * SSU_THREADS;
      const elem_t* win = stage + g.bcwin + c * W;
      float acc = bcb[j];
#pragma unroll
      for (int w = 0; w < MAX_W - 1; ++w) if (w < W - 1) acc = conv_tap(acc, ld(win[w + 1]), bcw[j][w]);
      acc = conv_tap(acc, bin[j], blast[j]);
      Bs[c] = silu(acc);  // c >= N lands in Cs[c - N]
    }
    __syncthreads();
    if (i > 0 && warp == 0) {  // the previous slice's sum of squares (fixed order: deterministic)
      const float v = warp_sum(lane < SSU_WARPS ? s_red[(i - 1) & 1][lane] : 0.0f);
      if (lane == 0) p.sumsq[s - 1] = v;
    }
    if (new_bc) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) { bq[j] = Bs[n0 + j]; cq[j] = Cs[n0 + j]; }
    }
    const float dt = sd[0], dA = sd[1], Dh = sd[2];

    // ---- 4. the state: h = h * dA + dt * x * B, y = h . C
    elem_t* out = p.ssm_state_out + (long long)s * g.PN;
    elem_t* yrow = p.y + (long long)r * p.y_stride + h * P;
    float local_sq = 0.0f;
    float rs[MAX_ITERS];  // the fast shape: each chunk's partial row sum, reduced after the loop
#pragma unroll
    for (int it = 0; it < MAX_ITERS; ++it) {
      const int e = (it * SSU_THREADS + tid) * VEC;
      if (e >= g.PN) break;
      const int row = row0 + it * rows_per_it;
      const float xv = xs[row];
      float acc = ssu_chunk(stage + e, out + e, dt * xv, dA, bq, cq);
      if (FAST) {
        rs[it] = acc;
        continue;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1)  // the row's lanes: a butterfly over N / VEC lanes (uniform condition)
        if (o < lanes_per_row) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (n0 == 0) {
        const float gv = ssu_gated(acc, Dh, xv, zs[row]);
        yrow[row] = st(gv * ws[row]);
        local_sq = sq_add(local_sq, gv);
      }
    }
    if (FAST) {  // lane holds chunk 2 * bit3 + bit2 of its row; lanes 0 and 16 sum the squares in chunk order
      const float acc = ssu_row_sums(reinterpret_cast<const float (&)[4]>(rs), lane);
      const int row = row0 + (((lane >> 3) & 1) * 2 + ((lane >> 2) & 1)) * rows_per_it;
      const float xv = xs[row];
      const float gv = ssu_gated(acc, Dh, xv, zs[row]);
      if ((lane & 3) == 0) yrow[row] = st(gv * ws[row]);
      const float g1 = __shfl_down_sync(0xffffffffu, gv, 4), g2 = __shfl_down_sync(0xffffffffu, gv, 8),
                  g3 = __shfl_down_sync(0xffffffffu, gv, 12);
      if ((lane & 15) == 0) {
        local_sq = sq_add(local_sq, gv);
        local_sq = sq_add(local_sq, g1);
        local_sq = sq_add(local_sq, g2);
        local_sq = sq_add(local_sq, g3);
      }
    }
    const float wsq = warp_sum(local_sq);
    if (lane == 0) s_red[i & 1][warp] = wsq;

    // ---- 5. refill the stage just consumed (this thread's own bytes, read above) with slice i + SSU_STAGES
    if (i + SSU_STAGES < n) ssu_fetch<KP, KN, KW>(p, g, stage, s + SSU_STAGES, fc, fc.hg == 0);
    cp_async_commit();
    fc.advance(H, hpg);
    cur.advance(H, hpg);
    if (++slot == SSU_STAGES) slot = 0;
  }
  __syncthreads();
  if (warp == 0) {
    const float v = warp_sum(lane < SSU_WARPS ? s_red[(n - 1) & 1][lane] : 0.0f);
    if (lane == 0) p.sumsq[s0 + n - 1] = v;
  }
}

#if AIM_PARTS & 1
extern "C" __global__ void __launch_bounds__(SSU_THREADS, SSU_MIN_BLOCKS) aim_selective_state_update(SsuParams p) {
  PDL_START(p.rows, PDL_EARLY_SSU);
  __shared__ float s_red[2][SSU_WARPS];
  __shared__ float s_dt[2][3];  // per slice parity: dt, dA = exp(-dt * exp(A_log)), D
#if SSU_FAST
  if (p.headdim == SSU_FAST_P && p.d_state == SSU_FAST_N && p.d_conv == SSU_FAST_W) {
    ssu_body<SSU_FAST_P, SSU_FAST_N, SSU_FAST_W>(p, s_red, s_dt);
    return;
  }
#endif
#if SSU_GENERIC
  ssu_body<0, 0, 0>(p, s_red, s_dt);
#else
  __trap();  // a build for the AiM shape only (the host passes SSU_GENERIC=0 only for it)
#endif
}
#endif

// ----------------------------------------------------------------------------------------------------------
// aim_ssu_warps: the same op for the AiM shape (headdim 64, d_state 128, d_conv 4) with every warp on its own.
// grid (G): G * SSW_WARPS <= rows * nheads warps, each owning a contiguous run of slices; block SSW_WARPS * 32;
// dynamic shared memory (ssw_smem_bytes in kernels.py): per warp a ring of SSW_STAGES quarter slices (16 state
// rows), then the conv windows of its next slice (its head's 64 x channels, its group's 256 B/C channels).
// Why: in aim_selective_state_update the warps of a block share each slice, and a barrier per slice (for the
// conv results) held 31.6 % of their cycles at AiM-B batch 256 (ncu, bench/results/ncu_ssu_details_*). Here a
// warp computes a whole slice: each lane convolves the channels it needs and exchanges them by shuffles, so no
// warp ever waits for another; each lane copies (cp.async) exactly the bytes it later reads, as in the ring
// above. Lane l works on columns 8 (l % 16) .. + 7 of rows 2k + l / 16 of each quarter, as thread l of the
// block kernel does, and every sum runs in the block kernel's order: the outputs are bit-identical to it.
// Below ~2 slices per resident warp the block kernel is faster (one warp's slice is a longer chain than an
// eighth of one): the host picks this kernel from SSU_WARP_ROWS rows (kernels.py, model_defines).
#ifndef SSU_WARPS_KERNEL
#define SSU_WARPS_KERNEL 1
#endif
// Measured on the H200 (bench/results/ssw2_h200_2026-12-04.*, whole steps): 2 warps per block, 6 blocks per SM
// (smaller blocks take their places sooner behind the kernel before) by 0.1-0.6 % over 4 x 3; 1 x 12 lost 1-3 %.
#ifndef SSW_WARPS
#define SSW_WARPS 2
#endif
#ifndef SSW_STAGES
#define SSW_STAGES 4  // <= 4: a slice's windows are requested with its first quarter, after the last slice's use
#endif
#ifndef SSW_MIN_BLOCKS
#define SSW_MIN_BLOCKS (12 / SSW_WARPS)  // 12 warps per SM: the shared memory of 4 stages holds no more
#endif
#define SSW_QROWS (SSU_FAST_P / 4)          // state rows of a quarter slice
#define SSW_Q (SSW_QROWS * SSU_FAST_N)      // its elements: 8 chunks of VEC per lane
#define SSW_WIN (SSU_FAST_P * SSU_FAST_W + 2 * SSU_FAST_N * SSU_FAST_W)  // window elements per warp

#if (AIM_PARTS & 4) && SSU_WARPS_KERNEL
// Quarter q of slice s into `stage`: this lane's 8 chunks.
__device__ __forceinline__ void ssw_fetch(const SsuParams& p, elem_t* stage, int s, int q, int lane) {
  const elem_t* src = p.ssm_state_in + (long long)s * (SSU_FAST_P * SSU_FAST_N) + q * SSW_Q;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const int e = (k * 32 + lane) * VEC;
#pragma unroll
    for (int w = 0; w < WORDS8 / 4; ++w)
      cp_async16(stage + e + w * 16 / sizeof(elem_t), src + e + w * 16 / sizeof(elem_t));
  }
}
// The conv windows of the slice at cursor c: x channels lane and lane + 32 of its head, and (new_bc) B (lanes
// 0-15) or C (16-31) channels 8 (lane % 16) .. + 7 of its group, one 16-byte-aligned run of 8 windows.
__device__ __forceinline__ void ssw_fetch_windows(const SsuParams& p, elem_t* win, const SsuCursor& c,
                                                  bool new_bc, int lane) {
  constexpr int P = SSU_FAST_P, N = SSU_FAST_N, W = SSU_FAST_W;
  const elem_t* conv = p.conv_state_in + (long long)c.r * p.conv_dim * W;
#pragma unroll
  for (int k = 0; k < 2; ++k) copy_window(win + (lane + 32 * k) * W, conv + (c.h * P + lane + 32 * k) * W, W);
  if (new_bc) {
    const int ch = p.d_inner + (lane < 16 ? 0 : p.ngroups * N) + c.grp * N + 8 * (lane & 15);
#pragma unroll
    for (int w = 0; w < 8 * W * (int)sizeof(elem_t) / 16; ++w)
      cp_async16(win + P * W + lane * 8 * W + w * 16 / sizeof(elem_t), conv + ch * W + w * 16 / sizeof(elem_t));
  }
}
// The row sums of a quarter's 8 chunks per lane over the 16 lanes of each row, butterfly order as the block
// kernel's (lane bit 3, 2, 1, 0), exchanging half of the values at each level: returns the sum of chunk
// 4 * bit3 + 2 * bit2 + bit1 of the lane's rows (lanes l and l ^ 1 hold the same).
__device__ __forceinline__ float ssw_row_sums(const float (&a)[8], int lane) {
  const bool b3 = lane & 8, b2 = lane & 4, b1 = lane & 2;
  float k[4], m[2];
#pragma unroll
  for (int i = 0; i < 4; ++i) k[i] = (b3 ? a[i + 4] : a[i]) + __shfl_xor_sync(0xffffffffu, b3 ? a[i] : a[i + 4], 8);
#pragma unroll
  for (int i = 0; i < 2; ++i) m[i] = (b2 ? k[i + 2] : k[i]) + __shfl_xor_sync(0xffffffffu, b2 ? k[i] : k[i + 2], 4);
  const float v = (b1 ? m[1] : m[0]) + __shfl_xor_sync(0xffffffffu, b1 ? m[0] : m[1], 2);
  return v + __shfl_xor_sync(0xffffffffu, v, 1);
}

extern "C" __global__ void __launch_bounds__(SSW_WARPS * 32, SSW_MIN_BLOCKS) aim_ssu_warps(SsuParams p) {
  constexpr int P = SSU_FAST_P, N = SSU_FAST_N, W = SSU_FAST_W;
  static_assert(SSW_STAGES >= 1 && SSW_STAGES <= 4, "SSW_STAGES: 1 to 4");
  PDL_START(p.rows, PDL_EARLY_SSU);
  extern __shared__ __align__(16) unsigned char ssu_smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int H = p.nheads, hpg = p.nheads / p.ngroups, total = p.rows * H;
  const int gw = blockIdx.x * SSW_WARPS + warp, nw = gridDim.x * SSW_WARPS;
  const int s0 = (int)((long long)gw * total / nw);
  // >= 1 when the host launches nw <= total warps (it does unless rows * nheads < SSW_WARPS: then a warp with
  // no slice writes nothing and leaves at once, its block's other warp waits for the kernel before)
  const int n = (int)((long long)(gw + 1) * total / nw) - s0;
  elem_t* ring = reinterpret_cast<elem_t*>(ssu_smem) + warp * (SSW_STAGES * SSW_Q);
  elem_t* win = reinterpret_cast<elem_t*>(ssu_smem) + SSW_WARPS * SSW_STAGES * SSW_Q + warp * SSW_WIN;
  const elem_t* xwin = win + (size_t)lane * W;               // this lane's x channels: lane, lane + 32
  const elem_t* bcwin = win + P * W + (size_t)lane * 8 * W;  // its 8 B or C channels
  const int hb = lane >> 4;                                   // the lane's row within a pair of rows
  const int cq = ((lane >> 3) & 1) * 4 + ((lane >> 2) & 1) * 2 + ((lane >> 1) & 1);  // its chunk after the sums

  // ---- the first quarters and the first slice's windows: this layer's own state, requested before PDL_WAIT
  SsuCursor cur, fc;
  cur.init(s0, H, hpg);
  fc = cur;  // the slice whose windows are requested next
#pragma unroll
  for (int t = 0; t < SSW_STAGES; ++t) {
    if (t < 4 * n) {
      if (t == 0) { ssw_fetch_windows(p, win, fc, true, lane); fc.advance(H, hpg); }
      ssw_fetch(p, ring + t * SSW_Q, s0, t, lane);
    }
    cp_async_commit();
  }

  float bq[VEC], cc[VEC];  // B and C of the lane's columns for the current (row, group)
  int t = 0;               // the quarter computed next (of the run)
  for (int i = 0; i < n; ++i) {
    const int s = s0 + i, r = cur.r, h = cur.h, grp = cur.grp;
    const bool new_bc = i == 0 || cur.hg == 0;
    // ---- 1. weights (for the first slice, before PDL_WAIT)
    float taps[2][MAX_W], xb[2], nwt[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int ch = h * P + lane + 32 * k;
#pragma unroll
      for (int w = 0; w < W; ++w) taps[k][w] = ld(p.conv_w[ch * W + w]);
      xb[k] = ld(p.conv_b[ch]);
      nwt[k] = ld(p.norm_w[ch]);
    }
    const float dt_bias = ld(p.dt_bias[h]), A_log = ld(p.A_log[h]), Dh = ld(p.D[h]);
    const int bch = p.d_inner + (lane < 16 ? 0 : p.ngroups * N) + grp * N + 8 * (lane & 15);  // new_bc
    if (i == 0) PDL_WAIT(p.rows, PDL_EARLY_SSU);

    // ---- 2. in_proj's outputs for this slice (L2)
    const elem_t* xbc = p.xbc + (long long)r * p.xbc_stride;
    elem_t xin[2];
    float zv[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      xin[k] = xbc[h * P + lane + 32 * k];
      zv[k] = ld(p.z[(long long)r * p.z_stride + h * P + lane + 32 * k]);
    }
    float bin[8];
    if (new_bc)
#pragma unroll
      for (int j = 0; j < 8; ++j) bin[j] = ld(xbc[bch + j]);
    float dt, dA;
    ssu_dt(ld(p.dt[(long long)r * p.dt_stride + h]), dt_bias, A_log, dt, dA);

    // ---- 3. quarter 0 and the windows have landed: conv + SiLU of the lane's x channels (window written back)
    cp_async_wait<SSW_STAGES - 1>();
    float xs[2], zs[2], ws[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const elem_t* wk = xwin + 32 * k * W;
      elem_t* sout = p.conv_state_out + ((long long)r * p.conv_dim + h * P + lane + 32 * k) * W;
      float acc = xb[k];
#pragma unroll
      for (int w = 0; w < W - 1; ++w) { const elem_t v = wk[w + 1]; acc = conv_tap(acc, ld(v), taps[k][w]); sout[w] = v; }
      acc = conv_tap(acc, ld(xin[k]), taps[k][W - 1]);
      sout[W - 1] = xin[k];
      xs[k] = silu(acc);
      zs[k] = silu(zv[k]);
      ws[k] = nwt[k];
    }
    if (new_bc) {  // lanes 0-15 convolve B, 16-31 C, of the same 8 columns: swapped across the half-warps
      float v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int c = bch + j;
        float acc = ld(p.conv_b[c]);
#pragma unroll
        for (int w = 0; w < W - 1; ++w) acc = conv_tap(acc, ld(bcwin[j * W + w + 1]), ld(p.conv_w[c * W + w]));
        acc = conv_tap(acc, bin[j], ld(p.conv_w[c * W + W - 1]));
        v[j] = silu(acc);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float o = __shfl_xor_sync(0xffffffffu, v[j], 16);
        bq[j] = hb ? o : v[j];
        cc[j] = hb ? v[j] : o;
      }
    }

    // ---- 4. the state, a quarter at a time; each quarter's stage refilled as soon as it is consumed
    elem_t* out = p.ssm_state_out + (long long)s * (P * N);
    elem_t* yrow = p.y + (long long)r * p.y_stride + h * P;
    float sq = 0.0f;
#pragma unroll
    for (int q = 0; q < 4; ++q, ++t) {
      if (q > 0) cp_async_wait<SSW_STAGES - 1>();
      elem_t* stage = ring + (t % SSW_STAGES) * SSW_Q;
      const float xq = q < 2 ? xs[0] : xs[1], zq = q < 2 ? zs[0] : zs[1], wq = q < 2 ? ws[0] : ws[1];
      const int base = 16 * (q & 1) + hb;  // lane of row 16 q + hb's x channel, less 32 for q >= 2
      float a[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int e = (k * 32 + lane) * VEC;
        const float xv = __shfl_sync(0xffffffffu, xq, base + 2 * k);
        a[k] = ssu_chunk(stage + e, out + q * SSW_Q + e, dt * xv, dA, bq, cc);
      }
      const int tn = t + SSW_STAGES;  // refill this stage (the lane's own bytes, read above)
      if (tn < 4 * n) {
        if ((tn & 3) == 0) { ssw_fetch_windows(p, win, fc, fc.hg == 0, lane); fc.advance(H, hpg); }
        ssw_fetch(p, stage, s0 + (tn >> 2), tn & 3, lane);
      }
      cp_async_commit();
      const float acc = ssw_row_sums(a, lane);
      const int src = base + 2 * cq;
      const float gv = ssu_gated(acc, Dh, __shfl_sync(0xffffffffu, xq, src), __shfl_sync(0xffffffffu, zq, src));
      const float wv = __shfl_sync(0xffffffffu, wq, src);
      if (!(lane & 1)) yrow[16 * q + 2 * cq + hb] = st(gv * wv);
      sq = sq_add(sq, gv);  // rows hb + 2 cq + 16 q, q = 0..3: the block kernel's per-thread order
    }
    // ---- 5. the slice's sum of squares in the block kernel's tree: row pairs (2c, 2c + 1), then over c by
    // the butterfly of a warp sum of 8 values (c ^ 4, c ^ 2, c ^ 1)
    float v = sq + __shfl_xor_sync(0xffffffffu, sq, 16);
    v += __shfl_xor_sync(0xffffffffu, v, 8);
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    if (lane == 0) p.sumsq[s] = v;
    cur.advance(H, hpg);
  }
}
#endif

// ----------------------------------------------------------------------------------------------------------
// The B/C conv windows a selective-state update leaves to its consumer: window = (window[1:], new input).
struct ConvShift {
  const elem_t* xbc;  long long xbc_stride;  // (rows, conv_dim) the step's conv input, or null: nothing to do
  const elem_t* state_in;  elem_t* state_out;  // (rows, conv_dim, width) contiguous; may be equal
  int first, count, conv_dim, width;         // channels [first, first + count): the B and C of every group
};

__device__ __forceinline__ void conv_shift_one(const ConvShift& s, int r, int c) {  // row r, channel first + c
  const long long at = ((long long)r * s.conv_dim + s.first + c) * s.width;
  elem_t v[MAX_W];
#pragma unroll
  for (int w = 0; w < MAX_W; ++w)  // read the whole window before writing: in place is safe
    v[w] = w < s.width - 1 ? s.state_in[at + w + 1] : s.xbc[(long long)r * s.xbc_stride + s.first + c];
#pragma unroll
  for (int w = 0; w < MAX_W; ++w) if (w < s.width) s.state_out[at + w] = v[w];
}
__device__ void conv_shift(const ConvShift& s, int r) {  // row r, by the block's threads
  if (!s.xbc) return;
  for (int c = threadIdx.x; c < s.count; c += blockDim.x) conv_shift_one(s, r, c);
}

// 1/rms of each of a row's groups from the per-head sums of squares, added in a fixed order (deterministic).
__device__ float group_inv_rms(const float* sumsq, int heads, int count, float eps) {
  float t = 0.0f;
  for (int i = 0; i < heads; ++i) t += sumsq[i];
  return rsqrtf(t / count + eps);
}

// ----------------------------------------------------------------------------------------------------------
struct GatedNormParams {
  elem_t* y;  long long y_stride;  // (rows, d_inner) in/out: g * norm_w → g * norm_w / rms(g) over each group
  const float* sumsq;              // (rows, nheads) from aim_selective_state_update
  int rows, d_inner, nheads, ngroups;
  float eps;
  ConvShift bc;
};

// grid (rows); block 256. Completes the op where the next kernel cannot (ngroups > 1, or an op that must
// return the normed y and the whole conv state, as the TensorRT plugin does).
#if AIM_PARTS & 1
extern "C" __global__ void aim_gated_norm_apply(GatedNormParams p) {
  PDL_START(p.rows, PDL_EARLY_NORM);
  PDL_WAIT(p.rows, PDL_EARLY_NORM);
  __shared__ float s_inv[64];
  const int r = blockIdx.x, hpg = p.nheads / p.ngroups, group_size = p.d_inner / p.ngroups;
  conv_shift(p.bc, r);
  for (int g = threadIdx.x; g < p.ngroups; g += blockDim.x)
    s_inv[g] = group_inv_rms(p.sumsq + (long long)r * p.nheads + g * hpg, hpg, group_size, p.eps);
  __syncthreads();
  for (int i = threadIdx.x; i < p.d_inner; i += blockDim.x) {
    elem_t* v = p.y + (long long)r * p.y_stride + i;
    *v = st(ld(*v) * s_inv[i / group_size]);
  }
}
#endif

// ----------------------------------------------------------------------------------------------------------
struct NormParams {
  const elem_t* input;  long long input_stride;  // (rows, d): the embedding, or the previous mixer's output;
                                                 // null: the residual already holds the sum (a folded out_proj added it)
  const elem_t* gate;   long long gate_stride;   // (rows, d) gate of the previous block, or null (first layer)
  const float* sumsq;   // (rows, sumsq_heads) or null: input *= 1/rms of the previous gated norm (ngroups == 1)
  int sumsq_heads, sumsq_count;                   // heads to add; elements they cover (d_inner)
  ConvShift bc;                                   // the previous mixer's B/C conv windows, when it left them
  float* residual;                                // (rows, d) float32, in/out
  const elem_t* norm_w;                           // (d)
  const elem_t* norm2_w;                          // (d) second RMSNorm (final layer), or null
  const elem_t* shift;  const elem_t* scale;  long long mod_stride;  // out = x * (1 + scale) + shift
  elem_t* out;  long long out_stride;
  int rows, d, first;
  float eps;
};

// The previous gated norm's 1/rms for row r, into *out (lane 0): the row's per-head sums of squares,
// lane-strided, then a warp butterfly (a fixed order: deterministic); 1 without sums. Called by a whole warp
// (`lane`: 0-31). The norm kernel and the folded out_proj (aim_gemv_resid_*, aim_gemm_resid_*) both use it, so both give the same bits.
__device__ __forceinline__ void gated_row_scale(const NormParams& p, int r, int lane, float* out) {
  float t = 0.0f;
  if (p.sumsq)
    for (int i = lane; i < p.sumsq_heads; i += 32) t += p.sumsq[(long long)r * p.sumsq_heads + i];
  t = warp_sum(t);
  if (lane == 0) *out = p.sumsq ? rsqrtf(t / p.sumsq_count + p.eps) : 1.0f;
}
// A mixer's output element as the residual stream adds it: times its row's gated-norm scale (no contraction into
// the add that follows), then gated and rounded as the reference rounds gate * out. Shared as above.
__device__ __forceinline__ float gated_output(float out, float scale, float gate, bool gated) {
  const float v = __fmul_rn(out, scale);
  return gated ? ld(st(v * gate)) : v;
}

// grid (rows); block NORM_THREADS; d <= NORM_THREADS * NORM_PER. The row lives in registers. The weights and
// modulations (constant through a sample) are read before PDL_WAIT, so after it only the previous kernels'
// outputs are fetched: one round trip to L2, then the reductions.
#define NORM_THREADS 256
#define NORM_PER 8  // d <= NORM_THREADS * NORM_PER
#ifndef NORM_PER_ONLY
#define NORM_PER_ONLY 0  // 3, 4, 6 or 8: only that instance (a build for one model's width)
#endif
#if AIM_PARTS & 1
// PER: elements per thread, ceil(d / NORM_THREADS). ncu (bench/results/ncu_b1_*_v8.txt) showed the kernel
// latency-bound on its own instruction chain (~6,800 cycles for one 768-wide row at 10 cycles per instruction,
// 2 warps per scheduler), most of it the predicated-off iterations of a fixed 8: so PER is a constant per model
// width. Elements past d are zeros in every sum (x + 0 is x), so each instance gives the same bits.
template <int PER>
__device__ __forceinline__ void residual_norm_body(const NormParams& p) {
  __shared__ float s_red[32];
  __shared__ float s_scale;
  const int r = blockIdx.x, tid = threadIdx.x;
  float w1[PER], w2[PER], sh[PER], sc[PER];
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int i = tid + j * NORM_THREADS;
    w1[j] = w2[j] = sh[j] = sc[j] = 0.0f;  // lanes past d stay 0 (no garbage, e.g. NaN, in the sums)
    if (i >= p.d) continue;
    w1[j] = ld(p.norm_w[i]);
    w2[j] = p.norm2_w ? ld(p.norm2_w[i]) : 0.0f;
    sh[j] = ld(p.shift[(long long)r * p.mod_stride + i]);
    sc[j] = ld(p.scale[(long long)r * p.mod_stride + i]);
  }
  PDL_WAIT(p.rows, PDL_EARLY_NORM);
  float x[PER];
  float gate[PER], res[PER], in[PER];
#pragma unroll
  for (int j = 0; j < PER; ++j) {  // issue every load before using any
    const int i = tid + j * NORM_THREADS;
    in[j] = gate[j] = res[j] = 0.0f;
    if (i >= p.d) continue;
    in[j] = p.input ? ld(p.input[(long long)r * p.input_stride + i]) : 0.0f;
    gate[j] = p.gate ? ld(p.gate[(long long)r * p.gate_stride + i]) : 0.0f;
    res[j] = p.first ? 0.0f : p.residual[(long long)r * p.d + i];
  }
  // the previous gated norm's 1/rms: its heads' sums of squares, added as a fixed tree (warp 0's loads of it
  // follow its row loads, so both round trips overlap); nothing to scale (nor a barrier) when a folded out_proj
  // summed the row (p.input null, uniform)
  float scale = 1.0f;
  if (p.input) {
    if (tid < 32) gated_row_scale(p, r, tid, &s_scale);
    conv_shift(p.bc, r);  // while those loads are in flight
    __syncthreads();
    scale = s_scale;
  }
  float sq = 0.0f;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int i = tid + j * NORM_THREADS;
    x[j] = 0.0f;
    if (i >= p.d) continue;
    const float v = gated_output(in[j], scale, gate[j], p.gate != nullptr);
    const float rv = !p.input ? res[j] : p.first ? v : res[j] + v;
    if (p.input) p.residual[(long long)r * p.d + i] = rv;
    x[j] = rv;
    sq += rv * rv;
  }
  float inv = rsqrtf(block_sum(sq, s_red) / p.d + p.eps);
  if (p.norm2_w) {  // final layer: norm_f (rounded to the model type), then norm_final
    float sq2 = 0.0f;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      x[j] = ld(st(x[j] * inv * w1[j]));
      sq2 += x[j] * x[j];
    }
    inv = rsqrtf(block_sum(sq2, s_red) / p.d + p.eps);
  }
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int i = tid + j * NORM_THREADS;
    if (i >= p.d) continue;
    const float v = ld(st(x[j] * inv * (p.norm2_w ? w2[j] : w1[j])));
    p.out[(long long)r * p.out_stride + i] = st(v * (1.0f + sc[j]) + sh[j]);
  }
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS) aim_residual_norm(NormParams p) {
  PDL_START(p.rows, PDL_EARLY_NORM);
#if NORM_PER_ONLY  // a build for one model: only its instance (d <= NORM_THREADS * NORM_PER_ONLY, host-checked)
  residual_norm_body<NORM_PER_ONLY>(p);
#else
  const int per = (p.d + NORM_THREADS - 1) / NORM_THREADS;  // uniform: one instance runs
  if (per <= 3) residual_norm_body<3>(p);        // AiM-B (768)
  else if (per <= 4) residual_norm_body<4>(p);   // AiM-L (1024)
  else if (per <= 6) residual_norm_body<6>(p);   // AiM-XL (1536)
  else residual_norm_body<NORM_PER>(p);
#endif
}
#endif

// ----------------------------------------------------------------------------------------------------------
struct SampleParams {
  const elem_t* logits;  long long logits_stride;  // (2 * batch, vocab): conditional rows, then null-class rows
  int batch, vocab;
  int uncond_rows;    // rows from a conditional row to its null-class row: batch, or 0 for logits already mixed
  float cfg_scale, temperature;
  int top_k;          // 0: off
  float top_p;        // 1: off
  const long long* seeds;   // (batch) image seeds
  int* step;                // device token index k: step[0] for every image, or step[b] with `advance`
  int position_offset;      // token k is fed at position k + offset
  long long* tokens;  int num_tokens;  // (batch, num_tokens) out; column k written
  const long long* teacher; // (batch, num_tokens) or null: feed these tokens on instead of the draws (parity)
  float* mixed_out;         // (batch, vocab) or null: the mixed logits (parity tests)
  const elem_t* word_emb;  const elem_t* pos_emb;  int d;
  elem_t* next_input;       // (2 * batch, d) or null: embedding of token k at its position, for both halves
  long long* next_token;    // (batch) or null: token k, for runners whose step graph embeds it (TensorRT)
  int advance;              // 1: step holds one index per image; image b's block reads step[b] and leaves
                            // k + 1 there (the step's own advance: no aim_advance launch, ~0.5 µs per step)
};

__device__ __forceinline__ unsigned hash32(unsigned x) {  // 'lowbias32', as aim_rt.sampling._hash32
  x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16;
  return x;
}
__device__ __forceinline__ float uniform(unsigned long long seed, int step) {  // as aim_rt.sampling.uniforms
  unsigned hi = hash32((unsigned)(seed >> 32));
  unsigned key = hash32((unsigned)seed ^ hi);
  unsigned step_key = hash32((unsigned)step ^ 0x9E3779B9u);
  unsigned r = hash32(key + step_key);
  return (float)(r >> 8) * (1.0f / 16777216.0f);
}
__device__ __forceinline__ unsigned order_key(float f) {  // monotone float → uint
  unsigned b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_value(unsigned k) {  // order_key's inverse (bit-exact, NaNs included)
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

// One block of SAMPLE_THREADS per image. The row (vocab <= SAMPLE_VMAX) is read once into registers; after the
// top-k select only its survivors (~top_k entries) are handled, from a list in shared memory.
#ifndef SAMPLE_THREADS
#define SAMPLE_THREADS 1024
#endif
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)
#define NEXT_PER 2  // next-input elements per thread held in registers (d <= 2048; wider rows loop)
#define SAMPLE_VMAX 16384
#define MAX_PER (SAMPLE_VMAX / SAMPLE_THREADS)  // vocabulary entries per thread
#define NBINS 4096                              // histogram bins of a select
#define BINS_PER (NBINS / SAMPLE_THREADS)
#define LCAP 4096     // survivor list capacity; beyond it every thread keeps its own vocabulary slice as its list
#define LPER (LCAP / SAMPLE_THREADS)  // list entries per thread
#define NCAND 32      // boundary-bin entries that one warp resolves by counting (more: finer histograms)
#define FIXED_ONE 1099511627776.0  // 2^40: probabilities in fixed point, so every sum is exact and order-free
// Dynamic shared memory: NBINS * 8 (histograms) + LCAP * 6 (list keys and indices); Kernels.cfg_sample sizes it.

// CFG mix and temperature. x / 1 == x exactly (a NaN here comes from arithmetic, so it is canonical already):
// skipping the division at temperature 1 changes no bit.
template <bool UNIT_TEMPERATURE>
__device__ __forceinline__ float cfg_mix(float c, float u, float cfg_scale, float temperature) {
  const float m = u + (c - u) * cfg_scale;
  return UNIT_TEMPERATURE ? m : m / temperature;
}
__device__ __forceinline__ unsigned long long fixed_weight(unsigned key, float mx) {
  return (unsigned long long)(expf(key_value(key) - mx) * FIXED_ONE);
}

// Histogram bin of a value: monotone (a larger value never gets a larger bin; bin 0 holds the maximum), so the
// keys of one bin form an interval. The bins are logarithmic in the distance to the maximum relative to the
// row's range (256 per octave over 16 octaves): fine near the top, where top-k and top-p cut, whatever the
// logits' scale, and no outlier squeezes the rest into one bin. A NaN (canonical, the largest key) gets bin 0.
// Rows with a non-finite or zero range (inv == 0) use the keys' high bits instead.
struct BinMap { float mx, inv; unsigned kmx, kmn; };
__device__ __forceinline__ int coarse_bin(float x, const BinMap& m) {
  if (m.inv > 0.0f) {
    const float d = fmaxf(m.mx - x, 0.0f);
    const float r = fmaf(d, m.inv, 1.52587890625e-05f);  // + 2^-16: r in [2^-16, 1 + 2^-16], no lower clamp
    return min((int)(__float_as_uint(r) >> 15) - ((127 - 16) << 8), NBINS - 1);
  }
  const unsigned key = order_key(x);
  if (key >= m.kmx) return 0;
  if (key <= m.kmn) return NBINS - 1;
  return (int)((m.kmx - key) >> 20);
}

struct SelectOut { int bin; unsigned long long above; };
struct SampleShared {
  unsigned kmxw[32], kmnw[32];
  unsigned part32[32], klo[32], khi[32];
  unsigned long long part64[32];
  unsigned cand[NCAND];
  SelectOut sel;
  int nc;       // top-p boundary-bin entries gathered into cand
  int token, k;
  unsigned nk;  // top-k boundary-bin entries gathered into cand
  unsigned long long seed;
  unsigned key;
  float u;
};

// hist[i] += w, exactly, for any number of concurrent adds: 64-bit shared atomics are compare-and-swap loops
// (ATOMS.CAST.SPIN.64); two native 32-bit adds, the carry of the low word found from its old value
__device__ __forceinline__ void add64(unsigned long long* hist, int i, unsigned long long w) {
  unsigned* h = reinterpret_cast<unsigned*>(hist + i);  // little-endian: low word first
  const unsigned lo = (unsigned)w, old = atomicAdd(h, lo);
  const unsigned hi = (unsigned)(w >> 32) + (old + lo < old ? 1u : 0u);
  if (hi) atomicAdd(h + 1, hi);
}

// Exclusive prefix sum over the block in thread order; `total` gets the sum. One __syncthreads: the caller
// syncs before `part` is written again.
template <typename T>
__device__ __forceinline__ T block_excl_scan(T local, T* part, T& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T incl = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T t = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += t;
  }
  if (lane == 31) part[warp] = incl;
  __syncthreads();
  const T w = lane < SAMPLE_WARPS ? part[lane] : T(0);
  // 32 bits: the warps' partials summed in one instruction each (redux.sync, sm_80+) instead of a chain of five
  // dependent shuffles: 0.9 µs less per sampler launch (bench/results/sampler_redux_h200_2026-12-03.txt)
  if constexpr (sizeof(T) == 4) {
    total = __reduce_add_sync(0xffffffffu, w);
    return __reduce_add_sync(0xffffffffu, lane < warp ? w : T(0)) + incl - local;
  } else {
    // 64 bits (sums of 2^40 fixed-point weights, so a block's total is at most SAMPLE_VMAX * 2^40 = 2^54): the
    // same in two halves, bits 0-26 and 27 up; 32 of either sum below 2^32, so redux.sync adds them exactly
    static_assert(SAMPLE_VMAX <= (1 << 19), "a block's fixed-point total must stay below 2^59");
    const unsigned wl = (unsigned)w & 0x7FFFFFFu, wh = (unsigned)(w >> 27);
    const unsigned pl = lane < warp ? wl : 0u, ph = lane < warp ? wh : 0u;
    total = ((T)__reduce_add_sync(0xffffffffu, wh) << 27) + __reduce_add_sync(0xffffffffu, wl);
    return ((T)__reduce_add_sync(0xffffffffu, ph) << 27) + __reduce_add_sync(0xffffffffu, pl) + incl - local;
  }
}

// Walks the bins from bin 0 (largest values) and stores the bin where the cumulative count/mass first reaches
// target_of(total) (which must lie in [1, total]) and the mass before that bin. Returns the total.
template <typename T, typename F>
__device__ __forceinline__ T find_bin(const T* hist, F target_of, T* part, SelectOut* out) {
  T v[BINS_PER], local = 0;
#pragma unroll
  for (int q = 0; q < BINS_PER; ++q) {
    v[q] = hist[threadIdx.x * BINS_PER + q];
    local += v[q];
  }
  T total;
  const T before = block_excl_scan<T>(local, part, total);
  const T target = target_of(total);
  if (before < target && target <= before + local) {
    T run = before;
#pragma unroll
    for (int q = 0; q < BINS_PER; ++q) {
      if (run + v[q] >= target) {
        out->bin = threadIdx.x * BINS_PER + q;
        out->above = run;
        break;
      }
      run += v[q];
    }
  }
  __syncthreads();
  return total;
}

// One warp: among n <= 32 candidates (keys; weight 1, or their fixed-point probability), the key where the
// descending cumulative mass first reaches `need` (1 <= need <= their total). Exact integer sums: the result
// does not depend on the candidates' order.
template <bool WEIGHTED>
__device__ __forceinline__ unsigned resolve_warp(const unsigned* cand, int n, unsigned long long need, float mx) {
  const int lane = threadIdx.x & 31;
  const bool in = lane < n;
  const unsigned key = in ? cand[lane] : 0u;
  const unsigned long long w = in ? (WEIGHTED ? fixed_weight(key, mx) : 1ull) : 0ull;
  unsigned long long gt = 0, ge = 0;
#pragma unroll 4
  for (int m = 0; m < n; ++m) {
    const unsigned km = __shfl_sync(0xffffffffu, key, m);
    const unsigned long long wm = WEIGHTED ? __shfl_sync(0xffffffffu, w, m) : 1ull;
    if (km > key) gt += wm;
    if (km >= key) ge += wm;
  }
  const unsigned hit = __ballot_sync(0xffffffffu, in && gt < need && need <= ge);
  return __shfl_sync(0xffffffffu, key, (__ffs(hit) - 1) & 31);
}

// The same answer when the boundary bin holds more than NCAND entries (ties, odd rows): radix-select passes over
// the block's entries (each thread its `cnt` keys, key_of(j), read from memory: a rare path that should not hold
// registers) whose coarse bin is `bsel` (key >= floor_key, positive weight when WEIGHTED): first their key
// interval [lo, hi], then 12 bits of (hi - key) per pass (at most 3). Uses `hist` as scratch.
template <bool WEIGHTED, typename KeyOf>
__device__ unsigned refine(KeyOf key_of, int cnt, int bsel, const BinMap& map, unsigned floor_key,
                           unsigned long long need, unsigned long long* hist, SampleShared& sh) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  unsigned lo = 0xFFFFFFFFu, hi = 0u;
#pragma unroll 1
  for (int j = 0; j < cnt; ++j) {
    const unsigned key = key_of(j);
    if (key >= floor_key && coarse_bin(key_value(key), map) == bsel) {  // weight 0 too: harmless
      lo = min(lo, key);
      hi = max(hi, key);
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  if (lane == 0) { sh.klo[warp] = lo; sh.khi[warp] = hi; }
  __syncthreads();
  lo = lane < SAMPLE_WARPS ? sh.klo[lane] : 0xFFFFFFFFu;
  hi = lane < SAMPLE_WARPS ? sh.khi[lane] : 0u;
  for (int o = 16; o > 0; o >>= 1) {
    lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  while (lo < hi) {
    const int s = max(0, 20 - __clz(hi - lo));  // (hi - lo) >> s < NBINS
    for (int q = tid; q < NBINS; q += SAMPLE_THREADS) hist[q] = 0ull;
    __syncthreads();
#pragma unroll 1
    for (int j = 0; j < cnt; ++j) {
      const unsigned key = key_of(j);
      if (key < lo || key > hi || key < floor_key) continue;
      const unsigned long long w = WEIGHTED ? fixed_weight(key, map.mx) : 1ull;
      if (w) add64(hist, (int)((hi - key) >> s), w);
    }
    __syncthreads();
    find_bin<unsigned long long>(hist, [need](unsigned long long) { return need; }, sh.part64, &sh.sel);
    const unsigned bb = sh.sel.bin;
    need -= sh.sel.above;
    const unsigned width = (bb << s) + ((1u << s) - 1u);  // the new interval: hi - (bb << s) - (2^s - 1) ..
    lo = hi - lo > width ? hi - width : lo;                //                   hi - (bb << s)
    hi -= bb << s;
  }
  return lo;
}

struct RowSelect {  // what the top-k stage hands on
  bool topk, topp, direct;
  int bstar, nc;              // top-k boundary bin and its entry count (in sh.cand up to NCAND)
  unsigned long long need;    // top-k rank within that bin
};

// Stages 3-5 over each thread's `cnt` entries key[] (its chunk of the survivor list, or its vocabulary slice):
// top-k cut resolved, top-p, the draw. Returns the token this thread drew (-1 in every other thread; in all of
// them when nothing is kept). hist64 must be zero on entry when rs.topp.
template <int NPER, typename KeyOf>
__device__ __forceinline__ int finish(const unsigned (&key)[NPER], KeyOf key_of, int cnt, int first,
                                      const unsigned short* lidx, const RowSelect& rs, const BinMap& map,
                                      float top_p, unsigned long long* hist64, SampleShared& sh) {
  constexpr bool CACHE = NPER <= LPER;  // few entries: keep their weights in registers
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float mx = map.mx;

  // top-k: the k-th largest key, within the boundary bin
  unsigned kth = 0;
  if (rs.topk) {
    if (rs.nc <= NCAND) {
      if (warp == 0) {
        kth = resolve_warp<false>(sh.cand, rs.nc, rs.need, mx);
        if (lane == 0) sh.key = kth;
      }
      __syncthreads();
      kth = sh.key;
    } else {
      kth = refine<false>(key_of, cnt, rs.bstar, map, 0u, rs.need, hist64, sh);
      if (rs.topp) {  // refine used the histogram
#pragma unroll
        for (int q = 0; q < BINS_PER; ++q) hist64[tid * BINS_PER + q] = 0ull;
        __syncthreads();
      }
    }
  }

  unsigned long long w[CACHE ? NPER : 1];
  auto weight = [&](int j) -> unsigned long long {  // the probability of entry j if it survived top-k, else 0
    if constexpr (CACHE) return w[j];
    return key[j] >= kth ? fixed_weight(key[j], mx) : 0ull;
  };
  if constexpr (CACHE) {
#pragma unroll
    for (int j = 0; j < NPER; ++j) w[j] = j < cnt && key[j] >= kth ? fixed_weight(key[j], mx) : 0ull;
  }
  auto bin_of = [&](int j) { return coarse_bin(key_value(key[j]), map); };

  // top-p over the survivors: the same select, weighted by the fixed-point probabilities. In descending order
  // the cut is the key where the mass first reaches z - limit (= the smallest key whose ascending cumulative
  // mass exceeds limit).
  unsigned cut = kth;
  bool by_bin = false;  // kept: the entries of positive weight in bins <= bp (valid if bin bp holds one of them)
  int bp = 0;
  unsigned long long need = 0;
  if (rs.topp) {
#pragma unroll
    for (int j = 0; j < NPER; ++j) {
      if (j >= cnt) continue;
      const unsigned long long wj = weight(j);
      if (wj) add64(hist64, bin_of(j), wj);
    }
    __syncthreads();
    const unsigned long long z = find_bin<unsigned long long>(hist64, [top_p](unsigned long long total) {
      const unsigned long long limit = (unsigned long long)((double)total * (1.0 - (double)top_p));
      return limit < total ? total - limit : 0ull;
    }, sh.part64, &sh.sel);
    const unsigned long long limit = (unsigned long long)((double)z * (1.0 - (double)top_p));
    if (limit >= z) {
      cut = 0xFFFFFFFFu;  // nothing exceeds the limit: nothing is kept (as an exact ascending walk finds)
    } else {
      bp = sh.sel.bin;
      need = z - limit - sh.sel.above;
      by_bin = true;
    }
  }
  // The draw: inverse CDF in vocabulary order, the first kept token whose cumulative mass exceeds u * total.
  // The usual top-p boundary bin holds one entry of positive weight: that entry is the cut whatever `need`
  // (1 <= need <= its weight), so the entries kept are those of positive weight in bins <= bp, and the draw's
  // scan goes ahead without finding the cut. The bin's entries go to sh.cand on the way (their count and keys
  // published by the scan's barrier); with more than one, the cut is resolved from them and the scan repeated.
  unsigned long long local = 0, total;
#pragma unroll
  for (int j = 0; j < NPER; ++j) {
    if (j >= cnt) continue;
    const unsigned long long wj = weight(j);
    if (by_bin) {
      if (wj) {
        const int bj = bin_of(j);
        local += bj <= bp ? wj : 0ull;
        if (bj == bp) {
          const int slot = atomicAdd(&sh.nc, 1);
          if (slot < NCAND) sh.cand[slot] = key[j];
        }
      }
    } else if (key[j] >= cut) {
      local += wj;
    }
  }
  unsigned long long before = block_excl_scan<unsigned long long>(local, sh.part64, total);
  if (by_bin && sh.nc != 1) {
    by_bin = false;
    const int nc = sh.nc;
    if (nc <= NCAND) {
      if (warp == 0) {
        const unsigned c = resolve_warp<true>(sh.cand, nc, need, mx);
        if (lane == 0) sh.key = c;
      }
      __syncthreads();
      cut = sh.key;
    } else {
      cut = refine<true>(key_of, cnt, bp, map, kth, need, hist64, sh);
    }
    local = 0;
#pragma unroll
    for (int j = 0; j < NPER; ++j)
      if (j < cnt && key[j] >= cut) local += weight(j);
    before = block_excl_scan<unsigned long long>(local, sh.part64, total);
  }
  const unsigned long long target = (unsigned long long)((double)total * (double)sh.u);
  int mine = -1;
  if (before <= target && target < before + local) {
    unsigned long long run = before;
#pragma unroll
    for (int j = 0; j < NPER; ++j) {
      if (j >= cnt) continue;
      const unsigned long long wj = weight(j);
      if (!wj || (by_bin ? bin_of(j) > bp : key[j] < cut)) continue;
      run += wj;
      if (run > target) {
        mine = lidx ? lidx[first + j] : first + j;
        break;
      }
    }
  }
  return mine;
}

// Bins of this thread's entries (two per register) and the top-k histogram of all of them. FULL: all MAX_PER
// entries are valid (the vocabulary fills the block: AiM's 16384), so no entry is checked (a check per entry
// made each a branch, ~5 instructions of ~13).
template <bool FLOAT_BINS, bool FULL>
__device__ __forceinline__ void bin_pass(const float (&x)[MAX_PER], int nvalid, const BinMap& map, unsigned* hist,
                                         unsigned (&pk)[MAX_PER / 2]) {
#pragma unroll
  for (int j = 0; j < MAX_PER; ++j) {
    unsigned bin = 0xFFFFu;
    if (FULL || j < nvalid) {
      if (FLOAT_BINS) {
        const float r = fmaf(fmaxf(map.mx - x[j], 0.0f), map.inv, 1.52587890625e-05f);  // as coarse_bin
        bin = (unsigned)min((int)(__float_as_uint(r) >> 15) - ((127 - 16) << 8), NBINS - 1);
      } else {
        bin = (unsigned)coarse_bin(x[j], map);
      }
      atomicAdd(hist + bin, 1u);
    }
    pk[j / 2] = (j & 1) ? (pk[j / 2] | (bin << 16)) : bin;
  }
}

template <bool UNIT_TEMPERATURE>
__device__ __forceinline__ void load_mixed(const elem_t* cond, const elem_t* uncond, int nvalid, float cfg_scale,
                                           float temperature, float (&x)[MAX_PER]) {
  if (nvalid == MAX_PER && (((unsigned long long)cond | (unsigned long long)uncond) & 15) == 0) {
    unsigned cu[MAX_PER / VEC][WORDS8], uu[MAX_PER / VEC][WORDS8];
#pragma unroll
    for (int q = 0; q < MAX_PER / VEC; ++q) {
      load8(cond + q * VEC, cu[q]);
      load8(uncond + q * VEC, uu[q]);
    }
#pragma unroll
    for (int q = 0; q < MAX_PER / VEC; ++q) {
      float c[VEC], u[VEC];
      unpack8(cu[q], c);  // bf16: one instruction per element (a shift or a mask)
      unpack8(uu[q], u);
#pragma unroll
      for (int i = 0; i < VEC; ++i) x[q * VEC + i] = cfg_mix<UNIT_TEMPERATURE>(c[i], u[i], cfg_scale, temperature);
    }
  } else {
#pragma unroll
    for (int j = 0; j < MAX_PER; ++j)
      x[j] = j < nvalid ? cfg_mix<UNIT_TEMPERATURE>(ld(cond[j]), ld(uncond[j]), cfg_scale, temperature) : 0.0f;
  }
}

// CFG mix and temperature, top-k (ties at the k-th value kept), top-p (drop the tokens whose ascending
// cumulative probability is <= 1 - top_p; the top token stays), inverse-CDF draw in vocabulary order, with the
// probabilities in 2^40 fixed point: every sum is an exact integer, so the token is the same in any thread
// order and batch (and the same as aim_rt.sampling.draw up to float rounding at the cut points).
// grid (batch); block SAMPLE_THREADS; dynamic shared memory NBINS * 8 + LCAP * 6 bytes.
#if AIM_PARTS & 2
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) aim_cfg_sample(SampleParams p) {
  PDL_START(2 * p.batch, PDL_EARLY_SAMPLE);
  extern __shared__ __align__(16) unsigned long long sample_smem[];
  unsigned long long* hist64 = sample_smem;                      // top-p (and refine) histogram
  unsigned* hist_all = reinterpret_cast<unsigned*>(sample_smem);  // top-k histogram; same memory
  unsigned* lkey = reinterpret_cast<unsigned*>(sample_smem + NBINS);  // survivor list, vocabulary order: keys
  unsigned short* lidx = reinterpret_cast<unsigned short*>(lkey + LCAP);  //                 and token ids
  __shared__ SampleShared sh;
  const int b = blockIdx.x, V = p.vocab;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int per = (V + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
  const int lo = tid * per;  // this thread's contiguous slice of the vocabulary
  const int nvalid = max(0, min(per, V - lo));
  const elem_t* cond = p.logits + (long long)b * p.logits_stride;
  const elem_t* uncond = p.logits + (long long)(b + p.uncond_rows) * p.logits_stride;
  RowSelect rs;
  rs.topk = p.top_k > 0 && p.top_k < V;
  rs.topp = p.top_p < 1.0f;
  // The step index k and the seed go through shared memory, loaded before the row and stored after it: the
  // compiler moves any use of k in registers up to its load, and every warp then waited for k before it
  // requested the row (one more round trip to memory: 0.1-0.2 µs per launch, variant A in
  // bench/results/sampler_hybrid_h200_2026-12-03.txt).
  int k_load = 0;
  unsigned long long seed_load = 0;
  if (tid == 0) seed_load = (unsigned long long)p.seeds[b];  // an input of the step: read before the wait
  if (rs.topk) {
#pragma unroll
    for (int q = 0; q < BINS_PER; ++q) hist_all[tid * BINS_PER + q] = 0u;
  } else if (rs.topp) {
#pragma unroll
    for (int q = 0; q < BINS_PER; ++q) hist64[tid * BINS_PER + q] = 0ull;
  }
  // shared memory zeroed and the seed requested while the previous kernel finishes; the step index k is the
  // previous step's last write
  PDL_WAIT(2 * p.batch, PDL_EARLY_SAMPLE);
  if (tid == 0) k_load = p.step[p.advance ? b : 0];

  // 1. mixed logits in registers; the row's max (the weights' reference) and min (for the bins)
  float x[MAX_PER];
  if (p.temperature == 1.0f) load_mixed<true>(cond + lo, uncond + lo, nvalid, p.cfg_scale, p.temperature, x);
  else load_mixed<false>(cond + lo, uncond + lo, nvalid, p.cfg_scale, p.temperature, x);
  if (tid == 0) { sh.nc = 0; sh.nk = 0; sh.token = V; sh.k = k_load; sh.seed = seed_load; }
  if (p.mixed_out) {
#pragma unroll
    for (int j = 0; j < MAX_PER; ++j)
      if (j < nvalid) p.mixed_out[(long long)b * V + lo + j] = x[j];
  }
  float tmx = -3.402823466e38f, mn = 3.402823466e38f;
  if (nvalid == MAX_PER) {  // no check per entry (as bin_pass<FULL>)
#pragma unroll
    for (int j = 0; j < MAX_PER; ++j) {
      tmx = fmaxf(tmx, x[j]);
      mn = fminf(mn, x[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < MAX_PER; ++j) {
      if (j >= nvalid) continue;
      tmx = fmaxf(tmx, x[j]);
      mn = fminf(mn, x[j]);
    }
  }
  // the max and the min as order keys (tmx and mn are never NaN: fmaxf/fminf skip NaNs), one redux.sync each per
  // level instead of chains of five shuffles
  unsigned kmx = __reduce_max_sync(0xffffffffu, order_key(tmx)), kmn = __reduce_min_sync(0xffffffffu, order_key(mn));
  if (lane == 0) { sh.kmxw[warp] = kmx; sh.kmnw[warp] = kmn; }
  __syncthreads();
  kmx = __reduce_max_sync(0xffffffffu, lane < SAMPLE_WARPS ? sh.kmxw[lane] : 0u);
  kmn = __reduce_min_sync(0xffffffffu, lane < SAMPLE_WARPS ? sh.kmnw[lane] : 0xFFFFFFFFu);
  const float mx = key_value(kmx);
  mn = key_value(kmn);
  BinMap map;
  map.mx = mx;
  map.kmx = kmx;
  map.kmn = kmn;
  const float range = mx - mn;
  map.inv = 1.0f / range;
  if (!(range > 0.0f && range <= 3.402823466e38f && map.inv <= 3.402823466e38f)) map.inv = 0.0f;
  const int k = sh.k;
  if (tid == 0) sh.u = uniform(sh.seed, k);  // read after later __syncthreads
  // read now, used late: this thread's first element of the position embedding
  const int pos = k + p.position_offset;
  const float pos_e = p.next_input && tid < p.d ? ld(p.pos_emb[(long long)pos * p.d + tid]) : 0.0f;

  // 2. top-k: the bin of the k-th largest key, from a histogram of the whole row. A bound on that bin first, so
  // that only the entries above it are counted, cost more than it saved (official settings, batch 16: 11.5 µs
  // per launch without, 12.1 with the least of the threads' maxima as the bound, 13.1 with a select over a
  // histogram of those maxima; bench/results/sampler_nobound_h200_2026-12-03.txt). The entries of the bins up
  // to the k-th's go to the list (vocabulary order), that bin's to sh.cand.
  rs.direct = true;  // no list: every thread keeps its vocabulary slice (no top-k, or too many survivors)
  rs.bstar = 0;
  rs.nc = 0;
  rs.need = 0;
  int n = V;
  if (rs.topk) {
    unsigned pk[MAX_PER / 2];  // bins, two per register
    if (map.inv > 0.0f && nvalid == MAX_PER) bin_pass<true, true>(x, nvalid, map, hist_all, pk);
    else if (map.inv > 0.0f) bin_pass<true, false>(x, nvalid, map, hist_all, pk);
    else bin_pass<false, false>(x, nvalid, map, hist_all, pk);
    __syncthreads();
    find_bin<unsigned>(hist_all, [&](unsigned) { return (unsigned)p.top_k; }, sh.part32, &sh.sel);
    if (rs.topp) {  // the top-p histogram (the same memory) is zeroed under the list's barriers
#pragma unroll
      for (int q = 0; q < BINS_PER; ++q) hist64[tid * BINS_PER + q] = 0ull;
    }
    const unsigned bstar = sh.sel.bin;
    rs.bstar = (int)bstar;
    rs.need = (unsigned long long)p.top_k - sh.sel.above;
    // list entries: bins <= bstar, two per word. In (bin | 0x8000) - (bstar + 1) per 16-bit half (no borrow
    // crosses the halves: each is >= 0x8000 > bstar + 1) bit 15 is clear iff bin <= bstar; an invalid entry's
    // 0xFFFF never is. Two entries in five instructions, where a compare per entry took six each.
    const unsigned t1 = (bstar + 1u) * 0x10001u;
    unsigned cnt = 0;
#pragma unroll
    for (int q = 0; q < MAX_PER / 2; ++q) cnt += __popc(~((pk[q] | 0x80008000u) - t1) & 0x80008000u);
    unsigned tot;
    const unsigned off = block_excl_scan<unsigned>(cnt, sh.part32, tot);
    n = (int)tot;
    rs.nc = (int)(tot - (unsigned)sh.sel.above);  // the boundary bin's entries
    rs.direct = n > LCAP;
    // the boundary bin's entries (~10) into sh.cand in any order, by a shared counter
    auto candidate = [&](unsigned key) {
      const unsigned slot = atomicAdd(&sh.nk, 1u);
      if (slot < NCAND) sh.cand[slot] = key;
    };
    unsigned lpos = off;
    if (!rs.direct) {
#pragma unroll
      for (int j = 0; j < MAX_PER; ++j) {
        const unsigned bin = (pk[j / 2] >> (16 * (j & 1))) & 0xFFFFu;
        if (bin > bstar) continue;
        const unsigned key = order_key(x[j]);
        lkey[lpos] = key;
        lidx[lpos] = (unsigned short)(lo + j);
        ++lpos;
        if (bin == bstar) candidate(key);
      }
    } else {
#pragma unroll
      for (int j = 0; j < MAX_PER; ++j)
        if (((pk[j / 2] >> (16 * (j & 1))) & 0xFFFFu) == bstar) candidate(order_key(x[j]));
    }
    __syncthreads();
  }

  // 3-5. resolve top-k, top-p, draw: over a chunk of the list, or over the thread's own slice
  int mine;
  if (!rs.direct) {
    const int chunk = (n + SAMPLE_THREADS - 1) / SAMPLE_THREADS;  // <= LPER
    const int first = tid * chunk, cnt = max(0, min(chunk, n - first));
    unsigned key[LPER];
#pragma unroll
    for (int j = 0; j < LPER; ++j) key[j] = j < cnt ? lkey[first + j] : 0u;
    mine = finish<LPER>(key, [&](int j) { return lkey[first + j]; }, cnt, first, lidx, rs, map, p.top_p, hist64,
                        sh);
  } else {
    unsigned key[MAX_PER];
#pragma unroll
    for (int j = 0; j < MAX_PER; ++j) key[j] = order_key(x[j]);
    auto key_of = [&](int j) {  // as x[j] was computed
      const float c = ld(cond[lo + j]), v = ld(uncond[lo + j]);
      return order_key(p.temperature == 1.0f ? cfg_mix<true>(c, v, p.cfg_scale, p.temperature)
                                             : cfg_mix<false>(c, v, p.cfg_scale, p.temperature));
    };
    mine = finish<MAX_PER>(key, key_of, nvalid, lo, nullptr, rs, map, p.top_p, hist64, sh);
  }

  // `tokens` records the draw; with teacher forcing (parity runs) the teacher's token is fed on instead
  if (mine >= 0) sh.token = mine;
  __syncthreads();
  const int drawn = sh.token;
  const int tok = !p.teacher ? drawn : k < p.num_tokens ? (int)p.teacher[(long long)b * p.num_tokens + k] : 0;
  if (tid == 0 && k < p.num_tokens) p.tokens[(long long)b * p.num_tokens + k] = drawn;
  if (tid == 0 && p.advance) p.step[b] = k + 1;  // only this block reads step[b]: no race, no atomic
  if (tid == 0 && p.next_token) p.next_token[b] = tok;
  if (!p.next_input) return;
  // the next step's input, word + position embedding: every load before the first store (the stores may alias
  // the tables for all the compiler knows, so a loop stored one element before it requested the next: AiM-XL's
  // 1536 wide rows took two round trips)
  elem_t e[NEXT_PER];
#pragma unroll
  for (int j = 0; j < NEXT_PER; ++j) {
    const int i = tid + j * SAMPLE_THREADS;
    const float pe = j == 0 ? pos_e : i < p.d ? ld(p.pos_emb[(long long)pos * p.d + i]) : 0.0f;
    if (i < p.d) e[j] = st(ld(p.word_emb[(long long)tok * p.d + i]) + pe);
  }
#pragma unroll
  for (int j = 0; j < NEXT_PER; ++j) {
    const int i = tid + j * SAMPLE_THREADS;
    if (i >= p.d) break;
    p.next_input[(long long)b * p.d + i] = e[j];
    p.next_input[(long long)(b + p.batch) * p.d + i] = e[j];
  }
  for (int i = tid + NEXT_PER * SAMPLE_THREADS; i < p.d; i += SAMPLE_THREADS) {  // wider than the AiM models
    const elem_t v = st(ld(p.word_emb[(long long)tok * p.d + i]) + ld(p.pos_emb[(long long)pos * p.d + i]));
    p.next_input[(long long)b * p.d + i] = v;
    p.next_input[(long long)(b + p.batch) * p.d + i] = v;
  }
}
#endif

// The token index's advance for callers that keep one index for all images (SampleParams.advance 0: the
// TensorRT runner); the cuda backend's sampler advances its per-image indices itself.
#if AIM_PARTS & 2
extern "C" __global__ void aim_advance(int* step) {
  PDL_START(0, 0);  // one thread: never in the way
  PDL_WAIT(0, 0);
  *step += 1;
}
#endif

// ----------------------------------------------------------------------------------------------------------
// Skinny matrix product for the decode step: y (rows, n) = x (rows, k) · w (n, k)^T, rows <= 16 * min(4, 8 / NT)
// (2 to 64 rows: batch <= 32 with CFG). At these sizes the weights are the traffic, so each weight element is
// read exactly once, and before PDL_WAIT: a block fills its registers with its weight tile while the previous
// kernel still runs, then waits, reads x (small, in L2) and multiplies on the tensor cores (mma.sync m16n8k16,
// rows padded to 16 with zeros). Grid: one block of 8 warps per 8 * NT output columns; warp j takes the j-th
// eighth of k, in chunks of 32; the 8 partial tiles are added in a fixed order (deterministic, and row r's
// result does not depend on the other rows). The sum over k is order-free, so within a chunk thread t holds
// k = 8t..8t+7 of its row for both operands: one 16-byte load each (the mma's own k order needs 4-byte loads).
// 16-bit types only (the fp32 model keeps cuBLAS: no fp32 tensor-core product is exact enough for parity).
struct GemvParams {
  const elem_t* x;  long long x_stride;  // (rows, k), rows 16-byte aligned
  const elem_t* w;                       // (n, k) contiguous
  elem_t* y;  long long y_stride;        // (rows, n)
  int rows, n, k;
};

// The residual add between two layers folded into out_proj's epilogue (16-bit types, ngroups == 1): what
// aim_residual_norm does with the previous mixer's output (its gated norm's 1/rms, the gate, the add to the
// float32 residual, the B/C window shift the state update left) is done where out_proj's outputs are summed,
// each element by the one thread that owns it, with the norm kernel's arithmetic (the same bits); the norm
// kernel then only norms the summed residual (NormParams.input null). GemvFoldParams.n is the NormParams that
// kernel would otherwise have taken whole.
// What a folded out_proj also hands to the next layer's in_proj when that one norms its own x (GemvNormParams),
// or xg null: the summed residual times the next layer's gm, rounded (in_proj's x), and per 8-column tile of
// the residual its squares' sum (summed in_proj-side in tile order: a fixed order for every instance).
struct GemvNext {
  elem_t* xg;  long long xg_stride;        // (rows, d) out
  const float* gm;  long long gm_stride;   // (rows, d) the next layer's norm weight * (1 + scale), float32
  float* sq_part;                          // (rows, d / 8) out
};
struct GemvFoldParams {
  GemvParams g;
  NormParams n;
  GemvNext next;
};

// in_proj with the residual norm between layers folded in (16-bit types; after a folded out_proj summed the
// residual). The norm's 1/rms is one number per row, so it factors out of the product:
//   in_proj(rmsnorm(x) * w * (1 + scale) + shift) = (1/rms(x)) * W (x * gm) + W shift,  gm = w * (1 + scale).
// The folded out_proj before it writes x * gm rounded (g.x) and the squares' sums of its column tiles
// (GemvNext); here the product runs on g.x as the plain one does, each row's tile sums are added in tile order
// beside it, and W shift, a constant through a sample that the same kernel made at the prefill (its bias mode:
// g.x the shift, the float32 product into bias_out; nothing else read), is read before PDL_WAIT. What the norm
// kernel rounded (its normed row) is here x * gm, so the bits differ from the separate norm's at that rounding;
// a row's bits depend neither on the other rows nor on the row count.
struct GemvNormParams {
  GemvParams g;                                   // g.x: x * gm rounded (GemvNext.xg); bias mode: the shift
  const float* sq_part;  int sq_parts;            // (rows, sq_parts = k / 8) GemvNext.sq_part
  const float* bias;  float* bias_out;  long long bias_stride;  // (rows, n) W shift; bias_out: make it instead
  float eps;
};

#ifndef GEMV_MAX_MT
#define GEMV_MAX_MT 4
#endif

// A normed in_proj's 1/rms of row r from its sq_parts tile sums, by a whole warp: lane-strided sums in tile order,
// then the butterfly (gemv_body's held sums add in the same order: the same bits).
__device__ __forceinline__ float norm_inv_rms(const float* sq_part, int sq_parts, int r, int lane, int k, float eps) {
  float t = 0.0f;
  for (int j = lane; j < sq_parts; j += 32) t += sq_part[(long long)r * sq_parts + j];
  t = warp_sum(t);
  return rsqrtf(t / k + eps);
}

#if ELEM_KIND != 0
__device__ __forceinline__ void mma_16816(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                          unsigned b0, unsigned b1) {
#if ELEM_KIND == 2
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// The folded epilogue's per-row scales (gated_row_scale) of rows [first, end): warp w takes rows first + w,
// first + w + nw, ... (nw warps). Split in two so that the loads are in flight together and early: scales_load
// requests the per-head sums of the warp's first R rows (two per lane: up to 64 heads), scales_finish adds them
// as gated_row_scale does (lane's heads in order, then warp_sum: the same bits) and does any further rows the
// plain way. gated_row_scale one row after another had put a round trip to L2 per row on the critical path.
// The caller synchronises before reading s_gs.
template <int R>
__device__ __forceinline__ void scales_load(const NormParams& f, int first, int end, float (&v)[R][2]) {
  const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  const bool fast = f.sumsq && f.sumsq_heads <= 64;
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int r = first + (int)(threadIdx.x >> 5) + i * nw;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int h = lane + 32 * q;
      v[i][q] = fast && r < end && h < f.sumsq_heads ? f.sumsq[(long long)r * f.sumsq_heads + h] : 0.0f;
    }
  }
}
template <int R>
__device__ __forceinline__ void scales_finish(const NormParams& f, int first, int end, const float (&v)[R][2],
                                              float* s_gs) {
  const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  int r = first + (int)(threadIdx.x >> 5);
  if (f.sumsq && f.sumsq_heads <= 64) {
#pragma unroll
    for (int i = 0; i < R; ++i, r += nw) {
      if (r >= end) break;  // uniform in the warp
      float t = 0.0f;
      t += v[i][0];  // heads lane, lane + 32: gated_row_scale's order (a missing one adds 0: the same sum)
      t += v[i][1];
      t = warp_sum(t);
      if (lane == 0) s_gs[r] = rsqrtf(t / f.sumsq_count + f.eps);
    }
  }
  for (; r < end; r += nw) gated_row_scale(f, r, lane, s_gs + r);
}
__device__ __forceinline__ void fold_row_scales(const NormParams& f, int first, int end, float* s_gs) {
  float v[2][2];
  scales_load<2>(f, first, end, v);
  scales_finish<2>(f, first, end, v, s_gs);
}
// The B/C windows the state update left, spread over the whole grid (each (row, channel) once).
__device__ __forceinline__ void fold_conv_shift(const ConvShift& bc, int rows) {
  if (!bc.xbc) return;
  const int stride = gridDim.x * blockDim.x;
  for (int it = blockIdx.x * blockDim.x + threadIdx.x; it < rows * bc.count; it += stride)
    conv_shift_one(bc, it / bc.count, it % bc.count);
}
// The same in two halves: shift_load reads this thread's first E windows' kept taps and new inputs into
// registers, shift_store writes them shifted and does any further items the plain way; in between the caller
// issues its other loads (the compiler cannot move a load above the stores: the pointers may alias). The new
// input is held apart from the taps: stored at a computed offset, it kept the taps out of local memory.
template <int E>
struct ShiftRegs {
  elem_t keep[E][MAX_W - 1], next[E];
};
template <int E>
__device__ __forceinline__ void shift_load(const ConvShift& bc, int rows, ShiftRegs<E>& v) {
  if (!bc.xbc) return;
  const int stride = gridDim.x * blockDim.x, it0 = blockIdx.x * blockDim.x + threadIdx.x;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int it = it0 + e * stride;
    if (it >= rows * bc.count) continue;
    const int r = it / bc.count, c = it % bc.count;
    const long long at = ((long long)r * bc.conv_dim + bc.first + c) * bc.width;
#pragma unroll
    for (int w = 0; w < MAX_W - 1; ++w)
      if (w < bc.width - 1) v.keep[e][w] = bc.state_in[at + w + 1];
    v.next[e] = bc.xbc[(long long)r * bc.xbc_stride + bc.first + c];
  }
}
template <int E>
__device__ __forceinline__ void shift_store(const ConvShift& bc, int rows, const ShiftRegs<E>& v) {
  if (!bc.xbc) return;
  const int stride = gridDim.x * blockDim.x, it0 = blockIdx.x * blockDim.x + threadIdx.x;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int it = it0 + e * stride;
    if (it >= rows * bc.count) continue;
    elem_t* out = bc.state_out + ((long long)(it / bc.count) * bc.conv_dim + bc.first + it % bc.count) * bc.width;
#pragma unroll
    for (int w = 0; w < MAX_W - 1; ++w)
      if (w < bc.width - 1) out[w] = v.keep[e][w];
    out[bc.width - 1] = v.next[e];
  }
  for (int it = it0 + E * stride; it < rows * bc.count; it += stride) conv_shift_one(bc, it / bc.count, it % bc.count);
}
// CH: chunks of 32 per warp, k = 8 warps * 32 * CH. NT: 8-column tiles per block; a warp multiplies the x
// fragments it loads by NT weight tiles (more rows re-read x: NT > 1 cuts that L2 traffic by NT).
// MT: m-tiles of 16 rows at most (8 * 16 partials per warp in shared memory): 16 * MT rows.
// f: null, or the residual add to fold into the epilogue (y is then not written). SPLIT: the fold's loads (row
// scales' sums, the windows to shift, residuals) all requested before x and consumed after the products;
// otherwise the scales and the shift are done before x is requested (fewer registers).
// nn (with f): what the next in_proj takes when it norms its own x (GemvNext; xg null: nothing). NORMED: nx is
// the residual norm folded in (GemvNormParams).
template <int CH, int NT, int MT, bool SPLIT, bool NORMED = false>
__device__ __forceinline__ void gemv_body(const GemvParams& p, const NormParams* f, const GemvNext* nn = nullptr,
                                          const GemvNormParams* nx = nullptr) {
  __shared__ float part[8][MT * NT][32][4];  // each warp's partial tiles, in fragment order
  __shared__ float s_gs[16 * MT];            // folded: each row's 1/rms of the gated norm; NORMED: of its norm
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int k0 = warp * (32 * CH) + 8 * t;
  uint4 wreg[NT][CH];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int n = (blockIdx.x * NT + j) * 8 + g;
#pragma unroll
    for (int c = 0; c < CH; ++c)
      wreg[j][c] = n < p.n ? *reinterpret_cast<const uint4*>(p.w + (long long)n * p.k + k0 + 32 * c)
                           : make_uint4(0, 0, 0, 0);
  }
  // the output elements this thread finishes at the end: i = threadIdx.x + 256 e (blockDim.x == 256)
  constexpr int EPI = (MT * NT * 128 + 255) / 256;
  const int mt = (p.rows + 15) >> 4;
  auto element = [&](int i, int& tile, int& row, int& col) {  // false past the tiles or the output
    const int l = (i >> 2) & 31, q = i & 3;
    tile = i >> 7;
    row = 16 * (tile / NT) + (l >> 2) + (q >= 2 ? 8 : 0);
    col = (blockIdx.x * NT + tile % NT) * 8 + 2 * (l & 3) + (q & 1);
    return i < mt * NT * 128 && row < p.rows && col < p.n;
  };
  // NORMED: W shift (made once per sample by this kernel in its bias mode), before the wait: it is a constant
  float bias[EPI];
  const bool make_bias = NORMED && nx->bias_out;  // (uniform)
  if constexpr (NORMED) {
#pragma unroll
    for (int e = 0; e < EPI; ++e) {
      int tile, row, col;
      bias[e] = !make_bias && element(threadIdx.x + 256 * e, tile, row, col)
                ? nx->bias[(long long)row * nx->bias_stride + col] : 0.0f;
    }
  }
  float fgate[EPI], fres[EPI], fgm[EPI];  // folded: gates and next gm (constants, before the wait), residuals
  const bool next = f && nn && nn->xg;     // (uniform)
  if (f) {
#pragma unroll
    for (int e = 0; e < EPI; ++e) {
      int tile, row, col;
      const bool in = element(threadIdx.x + 256 * e, tile, row, col);
      fgate[e] = f->gate && in ? ld(f->gate[(long long)row * f->gate_stride + col]) : 1.0f;
      fgm[e] = next && in ? nn->gm[(long long)row * nn->gm_stride + col] : 0.0f;
    }
  }
  PDL_WAIT(p.rows, PDL_EARLY_GEMV);
  // folded, SPLIT: the row scales' sums and this thread's windows requested with the residuals, all before x,
  // and consumed after the products (each had been a round trip to L2 before x was requested)
  constexpr int SR = 2 * MT < 4 ? 2 * MT : 4, SE = 1;  // rows per warp held (32 rows), windows per thread
  float sv[SR][2];
  ShiftRegs<SE> wv;
  if (f) {  // (uniform)
    if (SPLIT) {
      scales_load<SR>(*f, 0, p.rows, sv);
      shift_load<SE>(f->bc, p.rows, wv);
    }
#pragma unroll
    for (int e = 0; e < EPI; ++e) {
      int tile, row, col;
      fres[e] = element(threadIdx.x + 256 * e, tile, row, col) ? f->residual[(long long)row * f->d + col] : 0.0f;
    }
    if (!SPLIT) {
      fold_row_scales(*f, 0, p.rows, s_gs);
      fold_conv_shift(f->bc, p.rows);
    }
  }
  // NORMED: the column tiles' sums of squares of this warp's first NR rows (warp, warp + 8, ...), lane-strided
  // (k / 8 = 32 * CH of them: CH per lane), requested before x and added after the products; further rows
  // (past 16, or 32 in the wide tiles) the plain way after them. Held for every row the instance takes, they
  // cost the narrow product 22 registers and two of its five blocks per SM.
  constexpr int NR = NORMED ? (2 * MT < (NT > 1 ? 4 : 2) ? 2 * MT : (NT > 1 ? 4 : 2)) : 1, NP = NORMED ? CH : 1;
  float sqv[NR][NP];
  if constexpr (NORMED) {
#pragma unroll
    for (int i = 0; i < NR; ++i) {
      const int r = warp + 8 * i;
#pragma unroll
      for (int j = 0; j < NP; ++j)
        sqv[i][j] = !make_bias && r < p.rows ? nx->sq_part[(long long)r * nx->sq_parts + lane + 32 * j] : 0.0f;
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m >= mt) break;
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    const int r0 = 16 * m + g, r1 = r0 + 8;
    const elem_t* x0 = p.x + (long long)r0 * p.x_stride + k0;
    const elem_t* x1 = p.x + (long long)r1 * p.x_stride + k0;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const uint4 xa = r0 < p.rows ? *reinterpret_cast<const uint4*>(x0 + 32 * c) : make_uint4(0, 0, 0, 0);
      const uint4 xb = r1 < p.rows ? *reinterpret_cast<const uint4*>(x1 + 32 * c) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        mma_16816(acc[j], xa.x, xb.x, xa.y, xb.y, wreg[j][c].x, wreg[j][c].y);
        mma_16816(acc[j], xa.z, xb.z, xa.w, xb.w, wreg[j][c].z, wreg[j][c].w);
      }
    }
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) part[warp][m * NT + j][lane][q] = acc[j][q];
  }
  if (f && SPLIT) {
    scales_finish<SR>(*f, 0, p.rows, sv, s_gs);
    shift_store<SE>(f->bc, p.rows, wv);
  }
  if constexpr (NORMED) {  // each row's 1/rms: its tiles' sums in tile order (per lane, then the butterfly)
#pragma unroll
    for (int i = 0; i < NR; ++i) {
      const int r = warp + 8 * i;
      float t = 0.0f;
#pragma unroll
      for (int j = 0; j < NP; ++j) t += sqv[i][j];
      t = warp_sum(t);
      if (lane == 0 && r < p.rows) s_gs[r] = rsqrtf(t / p.k + nx->eps);
    }
    for (int r = warp + 8 * NR; r < p.rows && !make_bias; r += 8) {  // (uniform in the warp)
      const float v = norm_inv_rms(nx->sq_part, nx->sq_parts, r, lane, p.k, nx->eps);
      if (lane == 0) s_gs[r] = v;
    }
  }
  __syncthreads();
  // thread -> (tile, lane, q): add the 8 warps' partials in warp order and store one output element
#pragma unroll
  for (int e = 0; e < EPI; ++e) {
    const int i = threadIdx.x + 256 * e;
    int tile, row, col;
    const bool in = element(i, tile, row, col);
    float v = 0.0f;  // next: this element's square
    if (in) {
      const int l = (i >> 2) & 31, q = i & 3;
      float s = 0.0f;
#pragma unroll
      for (int w = 0; w < 8; ++w) s += part[w][tile][l][q];
      if constexpr (NORMED) {
        if (make_bias)
          nx->bias_out[(long long)row * nx->bias_stride + col] = s;
        else
          p.y[(long long)row * p.y_stride + col] = st(__fmaf_rn(s, s_gs[row], bias[e]));
      } else if (f) {
        // rounded as the norm kernel reads out_proj's output, then added as it adds it (the same bits)
        const float r = fres[e] + gated_output(ld(st(s)), s_gs[row], fgate[e], f->gate != nullptr);
        f->residual[(long long)row * f->d + col] = r;
        if (next) {
          nn->xg[(long long)row * nn->xg_stride + col] = st(r * fgm[e]);
          v = r * r;
        }
      } else {
        p.y[(long long)row * p.y_stride + col] = st(s);
      }
    }
    if (next) {  // (uniform) a row's 8 columns of a tile: i's bits 0, 2 and 3, lanes 1, 4, 8 apart
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      if (in && (i & 13) == 0) nn->sq_part[(long long)row * (p.n >> 3) + (col >> 3)] = v;
    }
  }
}

#define GEMV_ENTRY(NAME, CH, NT, MT) \
  extern "C" __global__ void __launch_bounds__(256) NAME(GemvParams p) { \
    PDL_START(p.rows, PDL_EARLY_GEMV);                                    \
    gemv_body<CH, NT, MT, false>(p, nullptr);                             \
  }
// The folded wide-tile instances (NT > 1: AiM-B's 17-32 rows) hold the fold's loads across the products
// (gemv_body's SPLIT) in up to 255 registers (one block per SM: they run 48-96 blocks). The narrow ones keep the
// fold before the products and their 3 blocks per SM: held across, they needed more registers (2 blocks per SM,
// or spills at 3) and their steps at 1-8 rows were slower (bench/results/prologue*_h200_2026-12-04.*).
#define GEMV_RESID_ENTRY(NAME, CH, NT, MT)                                                                      \
  extern "C" __global__ void __launch_bounds__(256, NT > 1 ? 1 : 0) NAME(const __grid_constant__ GemvFoldParams q) { \
    PDL_START(q.g.rows, PDL_EARLY_FOLD);                                                                        \
    gemv_body<CH, NT, MT, (NT > 1)>(q.g, &q.n, &q.next);                                                        \
  }
// in_proj with the residual norm folded in (GemvNormParams); launches as the plain product does. The narrow
// ones at GEMV_NORM_MIN_BLOCKS blocks per SM (0: as the compiler likes, 54 registers at AiM-B, so four blocks;
// 5, the plain one's there, took 48 registers and spilled a few: AiM-B batch 1 +3.9 %, AiM-XL +21 % per step,
// bench/results/normfold2_h100_2026-12-05.*).
#ifndef GEMV_NORM_MIN_BLOCKS
#define GEMV_NORM_MIN_BLOCKS 0
#endif
#define GEMV_NORM_ENTRY(NAME, CH, NT, MT)                                                                       \
  extern "C" __global__ void __launch_bounds__(256, NT > 1 ? 0 : GEMV_NORM_MIN_BLOCKS)                          \
  NAME(const __grid_constant__ GemvNormParams q) {                                                              \
    PDL_START(q.g.rows, PDL_EARLY_GEMV);                                                                        \
    gemv_body<CH, NT, MT, false, true>(q.g, nullptr, nullptr, &q);                                              \
  }
// X(CH, NT): aim_gemv_k<CH>_n<NT>, up to 16 * min(8 / NT, GEMV_MAX_MT) rows. Y(CH): aim_gemv_k<CH>_n1_m1, the
// one-tile product for up to 16 rows with one m-tile of partials (12 KB less shared memory, ~10 registers
// fewer; the same arithmetic, so the same bits). XR(CH, NT) / YR(CH): aim_gemv_resid_..., the same products
// with the residual add folded in (GemvFoldParams); XN(CH, NT) / YN(CH): aim_gemv_norm_..., with the residual
// norm folded in (GemvNormParams). The host compiles what a model needs
// (-DGEMV_INSTANCES="X(3,1) X(6,2) Y(12) XR(6,1)": each entry costs NVRTC time at a cold start); by default
// every X, the AiM models' out_proj XR and in_proj XN.
#define GEMV_MT(NT) (8 / NT < GEMV_MAX_MT ? 8 / NT : GEMV_MAX_MT)
#define X(CH, NT) GEMV_ENTRY(aim_gemv_k##CH##_n##NT, CH, NT, GEMV_MT(NT))
#define Y(CH) GEMV_ENTRY(aim_gemv_k##CH##_n1_m1, CH, 1, 1)
#define XR(CH, NT) GEMV_RESID_ENTRY(aim_gemv_resid_k##CH##_n##NT, CH, NT, GEMV_MT(NT))
#define YR(CH) GEMV_RESID_ENTRY(aim_gemv_resid_k##CH##_n1_m1, CH, 1, 1)
#define XN(CH, NT) GEMV_NORM_ENTRY(aim_gemv_norm_k##CH##_n##NT, CH, NT, GEMV_MT(NT))
#define YN(CH) GEMV_NORM_ENTRY(aim_gemv_norm_k##CH##_n1_m1, CH, 1, 1)
#if !(AIM_PARTS & 1)
#elif defined(GEMV_INSTANCES)
GEMV_INSTANCES
#else
X(1, 1) X(2, 1) X(3, 1) X(4, 1) X(6, 1) X(8, 1) X(12, 1) X(1, 4) X(2, 4) X(3, 4) X(4, 2) X(6, 2)
XR(6, 1) XR(8, 1) XR(12, 1) XR(6, 2)  // the AiM models' out_proj (d_inner 1536, 2048, 3072)
XN(3, 1) XN(3, 4) XN(6, 1)             // in_proj with the norm folded in (d_model 768, 1536)
#endif
#undef X
#undef Y
#undef XR
#undef YR
#undef XN
#undef YN
#endif

// ----------------------------------------------------------------------------------------------------------
// Matrix product for 33 to 128 rows (Hopper, 16-bit types): y (rows, n) = x (rows, k) · w (n, k)^T. At these
// sizes a library GEMM picks tiles that leave most SMs idle (cuBLAS: ~5 µs for AiM-B's products whatever their
// size, bench/results/product_bench_*). Here each output tile (all rows, GEMM_BN columns) is split over k
// between the CTAs of a thread-block cluster (p.splits <= 8, the cluster size), so that ~1-2 blocks per SM
// stream the weights; each CTA runs a GEMM_STAGES_M<MT>-deep cp.async pipeline of (x, w) k-chunks through shared
// memory (XOR-swizzled 16-byte chunks, ldmatrix, mma.sync m16n8k16), requesting its first weight chunks before
// PDL_WAIT. The split partials are added through distributed shared memory in cluster-rank order: deterministic,
// and a row's result does not depend on the other rows (nor on how many there are, for one (n, k)).
// Grid: (n / GEMM_BN rounded up) * p.splits CTAs, clusters of p.splits; block 256 (8 warps: 4 over the rows,
// 2 over the columns); dynamic shared memory gemm_smem_bytes in kernels.py.
struct GemmParams {
  const elem_t* x;  long long x_stride;  // (rows, k), rows 16-byte aligned
  const elem_t* w;                       // (n, k) contiguous, 16-byte aligned
  elem_t* y;  long long y_stride;        // (rows, n)
  int rows, n, k, splits;                // k: a multiple of GEMM_BK * splits
};
// aim_gemm as out_proj with the residual add folded in, as GemvFoldParams does for aim_gemv (n % 4 == 0), and
// what it hands to a normed in_proj (next.xg null: nothing; n % 8 == 0). Each thread holds four columns of a
// row and the next thread the other four of their 8-column tile: a tile's squares are summed in column order
// within each thread, then the two added (the sums' order differs from aim_gemv_resid's: where the products
// are aim_gemm's the bits differ from aim_gemv's anyway).
struct GemmFoldParams {
  GemmParams g;
  NormParams n;
  GemvNext next;
};
// aim_gemm as in_proj with the residual norm folded in, as GemvNormParams does for aim_gemv (n % 4 == 0): the
// same formula, each row's 1/rms by norm_inv_rms; in bias mode (bias_out set) g.x is the shift and the float32
// product goes to bias_out.
struct GemmNormParams {
  GemmParams g;
  const float* sq_part;  int sq_parts;
  const float* bias;  float* bias_out;  long long bias_stride;
  float eps;
};

#define GEMM_BN 64
#define GEMM_BK 64
#define GEMM_RED_LD (GEMM_BN + 8)  // row pitch (floats) of the partial tile in shared memory
// Each instance's pipeline depth (k-chunks in flight per CTA). The host passes these (GEMM_STAGES in kernels.py,
// deeper for the wide models: model_defines) and sizes the shared memory by them.
#ifndef GEMM_STAGES_M2
#define GEMM_STAGES_M2 4
#endif
#ifndef GEMM_STAGES_M4
#define GEMM_STAGES_M4 4
#endif
#ifndef GEMM_STAGES_M8
#define GEMM_STAGES_M8 4
#endif

#ifndef GEMM_M2
#define GEMM_M2 1  // 0: no 32-row instance (up to 64 rows run aim_gemm_m4; to measure)
#endif
#ifndef AIM_GEMM
#define AIM_GEMM 1  // 0: no aim_gemm entries (the host then runs cuBLAS above 32 rows; to measure)
#endif
// aim_gemm_resid_m<MT>, the instances the backend folds the residual add into (where it finds them): 1 the 64-row
// one (plus those FOLD_GEMM_M2 / _M8 below add), as measured at 4 stages (bench/results/foldgemm2_h200_2026-12-03.*,
// whole steps against the unfolded out_proj, tokens identical: 33-64 rows AiM-B b24 -2.0 %, AiM-XL b32 -3.7 %;
// 17-32 rows (m2) AiM-XL b16 +1.1 %, AiM-L b16 +3.8 %; 65-128 rows (m8) AiM-B b64 even); 2 every instance; 0 none
// (to measure).
#ifndef FOLD_GEMM
#define FOLD_GEMM 1
#endif
// With FOLD_GEMM 1, FOLD_GEMM_M2 / FOLD_GEMM_M8 1 fold the 32-row (m2) / 128-row (m8) instance too: model_defines
// sets them where that won (m2: AiM-XL once aim_gemm_m2 ran 8 stages, gemm_fold2_h200_2026-12-04.*; m8: AiM-L and
// XL, whose out_proj alone then runs aim_gemm up to 128 rows, gemm_foldmax_h200_2026-12-04.*).
#ifndef FOLD_GEMM_M2
#define FOLD_GEMM_M2 0
#endif
#ifndef FOLD_GEMM_M8
#define FOLD_GEMM_M8 0
#endif
// aim_gemm_norm_m<MT> (in_proj norming its own x, GemmNormParams) for the MTs whose bits are set (2 | 4 | 8; the
// host passes the instances a model's in_proj runs, 0 where it does not fold the norm: model_defines)
#ifndef GEMM_NORM
#define GEMM_NORM 14
#endif
#if (AIM_PARTS & 1) && AIM_GEMM && ELEM_KIND != 0 && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void cp_async16_zfill(unsigned dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
// Element offset of 16-byte chunk c of row r in a [rows][GEMM_BK] tile: chunks XOR-swizzled by the row, so the
// 8 rows an ldmatrix phase reads fall on 8 different bank groups.
__device__ __forceinline__ int gemm_swz(int r, int c) { return r * GEMM_BK + ((c ^ (r & 7)) << 3); }

// GEMM_WGMMA 1 (the default where the compiler targets sm_90a): the products run on wgmma, Hopper's warpgroup
// instruction, instead of ldmatrix + mma.sync. Swapped operands: the weight tile (GEMM_BN = 64 rows of w) is
// wgmma's A (m64) and the x tile (all 16 * MT rows) its B (n = 16 * MT), both read from the swizzled tiles
// above, which are the layout wgmma's 128-byte swizzle expects (8-row groups 1024 bytes apart, tile bases
// 1024-byte aligned). One warpgroup (warps 0-3) multiplies; all 8 warps load. One wgmma multiplies 64 x 16 * MT
// x 16 where mma.sync took ldmatrix + mma pairs per 16 x 8 tile: whole steps 1-4 % faster on an H100 (bench/
// results/wg*_h100_2026-12-06.*), no more, since the products mostly wait (SMs active ~60 % of the mma.sync
// product's cycles, 0.27 instructions per scheduler-cycle: ncu_gemm_stalls_h100_2026-12-06.txt).
#ifndef GEMM_WGMMA
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GEMM_WGMMA 1
#else
#define GEMM_WGMMA 0
#endif
#endif
#if GEMM_WGMMA
#if ELEM_KIND == 2
#define WGMMA_T "bf16"
#else
#define WGMMA_T "f16"
#endif
// Shared-memory matrix descriptor of a K-major tile with 128-byte swizzle: start address, leading byte offset
// 16 (unused by this layout), stride byte offset 1024 (between 8-row groups), swizzle mode 1 (128 bytes).
__device__ __forceinline__ unsigned long long wgmma_desc(unsigned addr) {
  return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// d (64 x N float32, in wgmma's accumulator layout) += A (64 x 16) * B (N x 16)^T
template <int N>
__device__ __forceinline__ void wgmma_k16(float (&d)[N / 2], unsigned long long a, unsigned long long b);
template <>
__device__ __forceinline__ void wgmma_k16<32>(float (&d)[16], unsigned long long a, unsigned long long b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." WGMMA_T "." WGMMA_T " {"
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
               "}, %16, %17, p, 1, 1, 0, 0;\n}"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
               : "l"(a), "l"(b), "r"(1));
}
template <>
__device__ __forceinline__ void wgmma_k16<64>(float (&d)[32], unsigned long long a, unsigned long long b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." WGMMA_T "." WGMMA_T " {"
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
               "}, %32, %33, p, 1, 1, 0, 0;\n}"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),
                 "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
                 "+f"(d[30]), "+f"(d[31])
               : "l"(a), "l"(b), "r"(1));
}
template <>
__device__ __forceinline__ void wgmma_k16<128>(float (&d)[64], unsigned long long a, unsigned long long b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." WGMMA_T "." WGMMA_T " {"
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
               "}, %64, %65, p, 1, 1, 0, 0;\n}"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),
                 "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
                 "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),
                 "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
                 "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]),
                 "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]),
                 "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
               : "l"(a), "l"(b), "r"(1));
}
#endif

// rows <= 16 * MT. The 8 warps: RW over the rows (each MT / RW m-tiles), 8 / RW over the columns (each
// GEMM_BN / (8 / RW) of them, NJ n-tiles of 8): MT 8 and 4 with RW 4, MT 2 (up to 32 rows) with RW 2, so that no
// warp multiplies an m-tile of rows past the 32nd.
// f: null, or the residual add to fold into the epilogue (y is then not written), as in gemv_body; nn (with f):
// what the next in_proj takes when it norms its own x. NORMED: nx is the residual norm folded in.
template <int MT, int RW, int STAGES, bool NORMED = false>
__device__ __forceinline__ void gemm_body(const GemmParams& p, const NormParams* f, const GemvNext* nn = nullptr,
                                          const GemmNormParams* nx = nullptr) {
  constexpr int BM = 16 * MT, MW = MT / RW, NJ = GEMM_BN / 8 / (8 / RW), A_TILE = BM * GEMM_BK, B_TILE = GEMM_BN * GEMM_BK;
  // the partial tile's row pitch (floats): a warp stores wgmma's accumulators 4 bytes at a time, 8 w rows x 4
  // x-row pairs, conflict-free at 68 (the pairs 8 banks apart); mma.sync's float2 stores at GEMM_RED_LD
  constexpr int RED_LD = GEMM_WGMMA ? GEMM_BN + 4 : GEMM_RED_LD;
  static_assert(BM * RED_LD * 4 <= STAGES * (A_TILE + B_TILE) * 2, "the partial tile reuses that memory");
  __shared__ float s_gs[BM];  // folded: the 1/rms of the gated norm of each row this CTA finishes; NORMED: of
                              // the residual norm
  extern __shared__ __align__(128) unsigned char gemm_smem[];
  // tiles 1024-byte aligned (the swizzle's period; gemm_smem_bytes adds the 1 KB this may skip)
  unsigned char* smem = gemm_smem + ((1024 - (smem_addr(gemm_smem) & 1023)) & 1023);
  elem_t* As = reinterpret_cast<elem_t*>(smem);       // STAGES x [BM][GEMM_BK]
  elem_t* Bs = As + STAGES * A_TILE;                  // STAGES x [GEMM_BN][GEMM_BK]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp % RW, wn = warp / RW;
  unsigned rank;
  asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  const int S = p.splits, tile = blockIdx.x / S, n0 = tile * GEMM_BN;
  const int chunks = p.k / GEMM_BK / S, kc0 = (int)rank * chunks;
  const unsigned as0 = smem_addr(As), bs0 = smem_addr(Bs);

  auto load_b = [&](int stage, int c) {  // 64 rows x 8 chunks: 2 per thread; rows past n zero-filled
    const int k0 = (kc0 + c) * GEMM_BK;
#pragma unroll
    for (int i = 0; i < GEMM_BN * 8 / 256; ++i) {
      const int e = tid + i * 256, r = e >> 3, ch = e & 7, n = n0 + r;
      const elem_t* src = p.w + (long long)(n < p.n ? n : 0) * p.k + k0 + ch * 8;
      cp_async16_zfill(bs0 + (stage * B_TILE + gemm_swz(r, ch)) * 2, src, n < p.n);
    }
  };
  auto load_a = [&](int stage, int c) {  // BM rows x 8 chunks; rows past p.rows zero-filled
    const int k0 = (kc0 + c) * GEMM_BK;
#pragma unroll
    for (int i = 0; i < BM * 8 / 256; ++i) {
      const int e = tid + i * 256, r = e >> 3, ch = e & 7;
      const elem_t* src = p.x + (long long)(r < p.rows ? r : 0) * p.x_stride + k0 + ch * 8;
      cp_async16_zfill(as0 + (stage * A_TILE + gemm_swz(r, ch)) * 2, src, r < p.rows);
    }
  };

  // the weights of the first stages before PDL_WAIT (they do not depend on the previous kernel), x after;
  // commit group s holds chunk s's x (group 0 also every early weight chunk)
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) if (s < chunks) load_b(s, s);
  PDL_WAIT(p.rows, PDL_EARLY_GEMV);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < chunks) load_a(s, s);
    cp_async_commit();
  }
  if (f) {  // (uniform) while the first chunks land: the scales of the rows this CTA finishes (blocks of 16 rows
            // from 16 * rank, every 16 * S: see the sum below) and its share of the window shift
    for (int b = 16 * (int)rank; b < p.rows; b += 16 * S) fold_row_scales(*f, b, min(b + 16, p.rows), s_gs);
    fold_conv_shift(f->bc, p.rows);
  }
  const bool make_bias = NORMED && nx->bias_out;  // (uniform)
  if (NORMED && !make_bias) {  // the same rows' 1/rms, a warp per row
    for (int b = 16 * (int)rank; b < p.rows; b += 16 * S)
      for (int r = b + warp; r < min(b + 16, p.rows); r += 8) {
        const float v = norm_inv_rms(nx->sq_part, nx->sq_parts, r, lane, p.k, nx->eps);
        if (lane == 0) s_gs[r] = v;
      }
  }

#if GEMM_WGMMA
  float acc[BM / 2];  // warps 0-3: the 64 x BM tile (w rows x x rows) in wgmma's layout
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) acc[i] = 0.0f;
#else
  float acc[MW][NJ][4];
#pragma unroll
  for (int i = 0; i < MW; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;
#endif

  for (int c = 0; c < chunks; ++c) {
    cp_async_wait<STAGES - 2>();
#if GEMM_WGMMA
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // cp.async's writes, read by wgmma (async proxy)
#endif
    __syncthreads();  // chunk c is in for every thread; the stage refilled below was consumed by all
    const int nxt = c + STAGES - 1;
    if (nxt < chunks) { load_a(nxt % STAGES, nxt); load_b(nxt % STAGES, nxt); }
    cp_async_commit();
    const int st = c % STAGES;
    const unsigned a_st = as0 + st * A_TILE * 2, b_st = bs0 + st * B_TILE * 2;
#if GEMM_WGMMA
    if (warp < 4) {  // (warp-uniform) the warpgroup: 4 k-steps of 16, then done before the stage is refilled
      wgmma_fence();
      const unsigned long long da = wgmma_desc(b_st), db = wgmma_desc(a_st);
#pragma unroll
      for (int kk = 0; kk < GEMM_BK / 16; ++kk) wgmma_k16<BM>(acc, da + 2 * kk, db + 2 * kk);  // +32 bytes of k
      wgmma_commit();
      wgmma_wait_all();
    }
#else
#pragma unroll
    for (int kk = 0; kk < GEMM_BK / 16; ++kk) {
      unsigned a[MW][4], b[NJ][2];
#pragma unroll
      for (int i = 0; i < MW; ++i) {
        const int r = (wm * MW + i) * 16 + (lane & 15);
        ldmatrix_x4(a_st + gemm_swz(r, kk * 2 + (lane >> 4)) * 2, a[i][0], a[i][1], a[i][2], a[i][3]);
      }
#pragma unroll
      for (int j = 0; j < NJ / 2; ++j) {
        const int r = wn * (8 * NJ) + j * 16 + (lane & 7) + ((lane >> 4) << 3);
        ldmatrix_x4(b_st + gemm_swz(r, kk * 2 + ((lane >> 3) & 1)) * 2, b[2 * j][0], b[2 * j][1], b[2 * j + 1][0],
                    b[2 * j + 1][1]);
      }
#pragma unroll
      for (int i = 0; i < MW; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j) mma_16816(acc[i][j], a[i][0], a[i][1], a[i][2], a[i][3], b[j][0], b[j][1]);
    }
#endif
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory is reused for the partial tile

  // this CTA's partial tile, [BM][GEMM_BN] float32 in shared memory (rows GEMM_RED_LD apart: a warp's stores
  // of 8 rows hit the banks twice, not 8 times); rank order sums them through the cluster
  float* red = reinterpret_cast<float*>(smem);
  const int g = lane >> 2, t = lane & 3;
#if GEMM_WGMMA
  if (warp < 4) {  // accumulator 4j + q: w row 16 warp + g (+8 for q >= 2), x row 8j + 2t (+1 for odd q)
#pragma unroll
    for (int j = 0; j < BM / 8; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q)
        red[(8 * j + 2 * t + (q & 1)) * RED_LD + 16 * warp + g + (q >> 1) * 8] = acc[4 * j + q];
  }
#else
#pragma unroll
  for (int i = 0; i < MW; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const int r = (wm * MW + i) * 16 + g, col = wn * (8 * NJ) + j * 8 + 2 * t;
      *reinterpret_cast<float2*>(red + r * RED_LD + col) = make_float2(acc[i][j][0], acc[i][j][1]);
      *reinterpret_cast<float2*>(red + (r + 8) * RED_LD + col) = make_float2(acc[i][j][2], acc[i][j][3]);
    }
#endif
  asm volatile("barrier.cluster.arrive.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
  const unsigned red0 = smem_addr(red);
  const int rows = min(p.rows, BM);
  for (int e = ((int)rank * 256 + tid) * 4; e < rows * GEMM_BN; e += S * 256 * 4) {
    const int r = e / GEMM_BN, c = e % GEMM_BN, col = n0 + c;
    // folded: this row's residuals and gates, requested with the partials (n % 4 == 0: four columns or none)
    float* res = f ? f->residual + (long long)r * f->d + col : nullptr;
    const bool next = f && nn && nn->xg;  // (uniform)
    float4 rv = make_float4(0.0f, 0.0f, 0.0f, 0.0f), gm = rv, bv = rv;  // gm: next; bv: NORMED, W shift
    float gate[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    if (f && col < p.n) {
      rv = *reinterpret_cast<const float4*>(res);
      if (f->gate)
#pragma unroll
        for (int q = 0; q < 4; ++q) gate[q] = ld(f->gate[(long long)r * f->gate_stride + col + q]);
      if (next) gm = *reinterpret_cast<const float4*>(nn->gm + (long long)r * nn->gm_stride + col);
    }
    if (NORMED && !make_bias && col < p.n)
      bv = *reinterpret_cast<const float4*>(nx->bias + r * nx->bias_stride + col);
    float4 v[8];  // every rank's four values requested before the first is added (one round trip, not S)
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      if (q >= S) break;
      unsigned remote;
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
                   : "=r"(remote) : "r"(red0 + (r * RED_LD + c) * 4), "r"(q));
      asm volatile("ld.shared::cluster.v4.f32 {%0,%1,%2,%3}, [%4];"
                   : "=f"(v[q].x), "=f"(v[q].y), "=f"(v[q].z), "=f"(v[q].w) : "r"(remote) : "memory");
    }
    float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int q = 0; q < 8; ++q) {  // rank order: the same sum whichever CTA adds it
      if (q >= S) break;
      sum.x += v[q].x; sum.y += v[q].y; sum.z += v[q].z; sum.w += v[q].w;
    }
    if (f) {  // rounded as the norm kernel reads out_proj's output, then added as it adds it (the same bits)
      const float sc = s_gs[r];
      const bool gated = f->gate != nullptr;
      rv.x += gated_output(ld(st(sum.x)), sc, gate[0], gated);
      rv.y += gated_output(ld(st(sum.y)), sc, gate[1], gated);
      rv.z += gated_output(ld(st(sum.z)), sc, gate[2], gated);
      rv.w += gated_output(ld(st(sum.w)), sc, gate[3], gated);
      if (col < p.n) *reinterpret_cast<float4*>(res) = rv;
      if (next && col < p.n) {  // (n % 8 == 0: this thread and the next hold one 8-column tile of row r, both
                                // here or neither)
        elem_t* xg = nn->xg + (long long)r * nn->xg_stride + col;
        const float g0 = rv.x * gm.x, g1 = rv.y * gm.y, g2 = rv.z * gm.z, g3 = rv.w * gm.w;
        if (((unsigned long long)xg & 7) == 0) {
          *reinterpret_cast<uint2*>(xg) = make_uint2(pack2(g0, g1), pack2(g2, g3));
        } else {
          xg[0] = st(g0); xg[1] = st(g1); xg[2] = st(g2); xg[3] = st(g3);
        }
        float sq = __fmul_rn(rv.x, rv.x);
        sq = __fmaf_rn(rv.y, rv.y, sq);
        sq = __fmaf_rn(rv.z, rv.z, sq);
        sq = __fmaf_rn(rv.w, rv.w, sq);
        sq += __shfl_xor_sync(3u << (lane & 30), sq, 1);
        if (!(lane & 1)) nn->sq_part[(long long)r * (p.n >> 3) + (col >> 3)] = sq;
      }
      continue;
    }
    if constexpr (NORMED) {
      if (make_bias) {
        if (col < p.n) *reinterpret_cast<float4*>(nx->bias_out + r * nx->bias_stride + col) = sum;
        continue;
      }
      const float sc = s_gs[r];
      sum = make_float4(__fmaf_rn(sum.x, sc, bv.x), __fmaf_rn(sum.y, sc, bv.y), __fmaf_rn(sum.z, sc, bv.z),
                        __fmaf_rn(sum.w, sc, bv.w));
    }
    elem_t* dst = p.y + (long long)r * p.y_stride + col;
    if (col + 3 < p.n && ((unsigned long long)dst & 7) == 0) {  // four results in one 8-byte store
      *reinterpret_cast<uint2*>(dst) = make_uint2(pack2(sum.x, sum.y), pack2(sum.z, sum.w));
    } else if (col + 3 < p.n) {
      dst[0] = st(sum.x); dst[1] = st(sum.y); dst[2] = st(sum.z); dst[3] = st(sum.w);
    } else {
      if (col < p.n) dst[0] = st(sum.x);
      if (col + 1 < p.n) dst[1] = st(sum.y);
      if (col + 2 < p.n) dst[2] = st(sum.z);
    }
  }
  asm volatile("barrier.cluster.arrive.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");  // reads done
}

// aim_gemm_m<MT>, and aim_gemm_resid_m<MT> with the residual add folded in (GemmFoldParams)
#define GEMM_ENTRY(MT, RW)                                                         \
  extern "C" __global__ void __launch_bounds__(256) aim_gemm_m##MT(GemmParams p) { \
    PDL_START(p.rows, PDL_EARLY_GEMV);                                             \
    gemm_body<MT, RW, GEMM_STAGES_M##MT>(p, nullptr);                              \
  }
#define GEMM_RESID_ENTRY(MT, RW)                                                     \
  extern "C" __global__ void __launch_bounds__(256)                                  \
      aim_gemm_resid_m##MT(const __grid_constant__ GemmFoldParams q) {               \
    PDL_START(q.g.rows, PDL_EARLY_FOLD);                                             \
    gemm_body<MT, RW, GEMM_STAGES_M##MT>(q.g, &q.n, &q.next);                        \
  }
// aim_gemm_norm_m<MT>: in_proj with the residual norm folded in (GemmNormParams), where GEMM_NORM has MT's bit
#define GEMM_NORM_ENTRY(MT, RW)                                                      \
  extern "C" __global__ void __launch_bounds__(256)                                  \
      aim_gemm_norm_m##MT(const __grid_constant__ GemmNormParams q) {                \
    PDL_START(q.g.rows, PDL_EARLY_GEMV);                                             \
    gemm_body<MT, RW, GEMM_STAGES_M##MT, true>(q.g, nullptr, nullptr, &q);           \
  }
GEMM_ENTRY(4, 4)
GEMM_ENTRY(8, 4)
#if FOLD_GEMM
GEMM_RESID_ENTRY(4, 4)
#endif
#if FOLD_GEMM > 1 || (FOLD_GEMM && FOLD_GEMM_M8)
GEMM_RESID_ENTRY(8, 4)
#endif
#if GEMM_NORM & 4
GEMM_NORM_ENTRY(4, 4)
#endif
#if GEMM_NORM & 8
GEMM_NORM_ENTRY(8, 4)
#endif
#if GEMM_M2
GEMM_ENTRY(2, 2)
#if FOLD_GEMM > 1 || (FOLD_GEMM && FOLD_GEMM_M2)
GEMM_RESID_ENTRY(2, 2)
#endif
#if GEMM_NORM & 2
GEMM_NORM_ENTRY(2, 2)
#endif
#endif
#undef GEMM_ENTRY
#undef GEMM_RESID_ENTRY
#undef GEMM_NORM_ENTRY
#endif
