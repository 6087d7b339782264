"""Where a process's first VQ decode goes (the images phase of scripts/cold_start.py): the fast decoder built,
its first eager call (cuDNN algorithm choice when benchmarking, lazy module loads), a second eager call, and a
fresh decoder's first graph call (a warm-up forward plus the capture). Run it in a new process; `--no-benchmark`
lets cuDNN's heuristics choose instead of timing its algorithms.

    PYTHONPATH=. python scripts/decode_first_call.py [--no-benchmark] [--batch 16] [--steady 1,16,64]

`--steady`: afterwards, graph calls of decoders with and without cudnn.benchmark, alternating (median).
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
    ap.add_argument("--steady", default="", help="batch sizes: then graph calls with and without cudnn.benchmark")
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
    for batch in [int(b) for b in args.steady.split(",") if b]:
        tok = torch.randint(0, model.vq.config.n_embed, (batch, tokens.shape[1]), device="cuda",
                            generator=torch.Generator(device="cuda").manual_seed(batch))
        decoders = {flag: FastVQDecoder(model.vq, torch.bfloat16, benchmark=flag) for flag in (True, False)}
        runs = {True: [], False: []}
        for _ in range(5):  # alternating, median of 5 rounds of 10 graph calls
            for flag, dec in decoders.items():
                dec(tok)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(10):
                    dec(tok)
                torch.cuda.synchronize()
                runs[flag].append((time.perf_counter() - t) / 10 * 1e3)
        same = torch.equal(decoders[True](tok), decoders[False](tok))
        print(f"batch {batch}: graph call {sorted(runs[True])[2]:.2f} ms with cudnn.benchmark, "
              f"{sorted(runs[False])[2]:.2f} ms with cuDNN's heuristics; same images: {same}", flush=True)


if __name__ == "__main__":
    main()
