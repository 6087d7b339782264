"""Where a process's first VQ decode goes (the images phase of scripts/cold_start.py): the fast decoder built,
its first eager call (cuDNN algorithm choice when benchmarking, lazy module loads), a second eager call, and a
fresh decoder's first graph call (a warm-up forward plus the capture). Run it in a new process; `--no-benchmark`
lets cuDNN's heuristics choose instead of timing its algorithms.

    PYTHONPATH=. python scripts/decode_first_call.py [--no-benchmark] [--batch 16]
"""

import argparse
import time

import torch

import aim_rt
from aim_rt.bench import _model
from aim_rt.cuda_backend import CudaBackend
from aim_rt.vq_fast import FastVQDecoder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-benchmark", action="store_true")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    bench = not args.no_benchmark
    model, _ = _model("AiM-B", torch.device("cuda"), "bfloat16", precompile=True)
    backend = CudaBackend(model)
    tokens = backend.sample(torch.arange(args.batch), torch.arange(args.batch), aim_rt.SamplingSettings())
    torch.cuda.synchronize()
    times = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times[name] = time.perf_counter() - t
        return out

    eager = timed("decoder built", lambda: FastVQDecoder(model.vq, torch.bfloat16, use_graphs=False, benchmark=bench))
    timed("first eager call", lambda: eager(tokens))
    timed("second eager call", lambda: eager(tokens))
    graphed = FastVQDecoder(model.vq, torch.bfloat16, benchmark=bench)
    timed("fresh decoder's first graph call", lambda: graphed(tokens))
    timed("its second call", lambda: graphed(tokens))
    print(f"decode of {args.batch} images, cudnn.benchmark {bench}: "
          + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
