"""What a grid-wide barrier costs inside one persistent kernel, against the hand-over between two kernels
(programmatic dependent launch in a CUDA graph): the number a persistent decode step would be built on.

Every phase each block reads a value another block wrote in the previous phase (one dependent L2 round trip, as
a real phase has), writes its own, then waits at the barrier. Prints µs per barrier (or per kernel) and writes
JSON. Usage: python scripts/barrier_bench.py [--out FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
from pathlib import Path

import torch

SRC = r"""
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v; asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ void red_release(unsigned* p, unsigned v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
// mode 0: __threadfence + atomicAdd + acquire poll; mode 1: red.release + acquire poll
__device__ __forceinline__ void grid_barrier(unsigned* counter, unsigned target, int mode) {
  __syncthreads();
  if (threadIdx.x == 0) {
    if (mode == 0) { __threadfence(); atomicAdd(counter, 1u); }
    else red_release(counter, 1u);
    while (ld_acquire(counter) < target) {}
  }
  __syncthreads();
}
extern "C" __global__ void chain(unsigned* counter, float* buf, int phases, int mode) {
  const int n = gridDim.x;
  float v = 0.0f;
  for (int ph = 0; ph < phases; ++ph) {
    if (threadIdx.x == 0) {
      v = __ldcg(buf + (ph & 1) * n + (blockIdx.x + 1) % n);
      buf[((ph + 1) & 1) * n + blockIdx.x] = v + 1.0f;
    }
    grid_barrier(counter, (unsigned)(ph + 1) * n, mode);
  }
}
// one phase as its own kernel (programmatic dependent launch)
extern "C" __global__ void one(float* buf, int ph) {
  asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory");
  const int n = gridDim.x;
  if (threadIdx.x == 0) {
    float v = __ldcg(buf + (ph & 1) * n + (blockIdx.x + 1) % n);
    buf[((ph + 1) & 1) * n + blockIdx.x] = v + 1.0f;
  }
}
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from cuda.bindings import driver

    from aim_rt.plugins.kernels import _check, compile_cubin, kernel_arch, pdl_attributes

    torch.empty(1, device="cuda")
    major, minor = torch.cuda.get_device_capability()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "barrier.cu"
        src.write_text(SRC)
        cubin = compile_cubin("float32", kernel_arch(major, minor), use_cache=False, source_path=src)
    mod = _check(driver.cuModuleLoadData(cubin), "load")
    chain = _check(driver.cuModuleGetFunction(mod, b"chain"), "fn")
    one = _check(driver.cuModuleGetFunction(mod, b"one"), "fn")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    buf = torch.zeros(2 * 8 * sms, device="cuda")
    coop = driver.CUlaunchAttribute()
    coop.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_COOPERATIVE
    coop.value.cooperative = 1

    def launch(fn, grid, params, attrs):  # params: ctypes values, in the kernel's argument order
        holder = (ctypes.c_void_p * len(params))(*[ctypes.addressof(p) for p in params])
        cfg = driver.CUlaunchConfig()
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid, 1, 1
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = 256, 1, 1
        cfg.hStream = driver.CUstream(torch.cuda.current_stream().cuda_stream)
        cfg.attrs = attrs
        cfg.numAttrs = len(attrs)
        _check(driver.cuLaunchKernelEx(cfg, fn, ctypes.addressof(holder), 0), "launch")

    def timed(fn, reps=5):
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); torch.cuda.synchronize()
            best = min(best, a.elapsed_time(b) * 1e3)
        return best

    phases, result = 2000, {"device": torch.cuda.get_device_name(), "sms": sms, "barrier_us": {}, "kernel_us": {}}
    for per_sm in (1, 2, 4):
        for mode in (0, 1):
            grid = per_sm * sms

            def run():
                counter.zero_()
                launch(chain, grid, [ctypes.c_void_p(counter.data_ptr()), ctypes.c_void_p(buf.data_ptr()),
                                      ctypes.c_int(phases), ctypes.c_int(mode)], [coop])
            us = timed(run) / phases
            result["barrier_us"][f"{grid} blocks, mode {mode}"] = us
            print(f"grid barrier, {grid} blocks, mode {mode}: {us:.3f} µs per phase", flush=True)
    for per_sm in (1, 2):
        grid = per_sm * sms
        g = torch.cuda.CUDAGraph()
        attrs = pdl_attributes(major)
        with torch.cuda.graph(g):
            for ph in range(200):
                launch(one, grid, [ctypes.c_void_p(buf.data_ptr()), ctypes.c_int(ph)], attrs)
        us = timed(g.replay) / 200
        result["kernel_us"][f"{grid} blocks, pdl {bool(attrs)}"] = us
        print(f"kernel chain (graph, PDL {bool(attrs)}), {grid} blocks: {us:.3f} µs per kernel", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
