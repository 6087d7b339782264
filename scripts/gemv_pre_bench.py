"""aim_gemv_pre (weights bulk-copied into shared memory before the kernel's wait) against aim_gemv in whole
decode steps: backends of one model that differ only in which products run it, alternating in one process, with
their tokens compared (the two kernels give the same bits, so the tokens must be equal), and the products' own
times from the kernel table's op timings.

    PYTHONPATH=. python scripts/gemv_pre_bench.py --out results/pre --cases AiM-B:1,AiM-XL:1,AiM-XL:4
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

VARIANTS = {  # name: (products through aim_gemv_pre, shared-memory cap per block in KB or None, carveout %)
    "gemv": ((), None, None),
    "gemv_c100": ((), None, 100),
    "pre_in": (("in_proj",), None, None),
    "pre_in_c100": (("in_proj",), None, 100),
    "pre_c100": (("in_proj", "out_proj"), None, 100),
}


def build(model, name: str):
    from aim_rt.cuda_backend import CudaBackend

    kinds, cap_kb, carveout = VARIANTS[name]
    b = CudaBackend(model)
    if carveout is not None:  # every kernel of the step asks for the same split of L1 and shared memory
        b.kernels.set_carveout(carveout)
    b.gemv_pre_kinds = frozenset(kinds)
    if cap_kb is not None:
        b.kernels.gemv_pre = functools.partial(b.kernels.gemv_pre, cap=cap_kb * 1024)
    return b


def main() -> None:
    from aim_rt.bench import _model, copy_bandwidth
    from aim_rt.sampling import SamplingSettings

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default="AiM-B:1,AiM-L:1,AiM-XL:1,AiM-XL:2,AiM-XL:4")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--op-times", default="gemv,pre", help="variants whose products are also timed alone")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    settings = SamplingSettings()
    result = {"device": torch.cuda.get_device_name(dev), "date": time.strftime("%Y-%m-%d"),
              "copy_bandwidth_TBps": copy_bandwidth(dev) / 1e12, "cases": {}}
    models: dict[str, list[int]] = {}
    for case in args.cases.split(","):
        name, batch = case.split(":")
        models.setdefault(name, []).append(int(batch))
    names = args.variants.split(",")
    for model_name, batches in models.items():
        model, _ = _model(model_name, dev, "bfloat16", precompile=True)
        backends = {v: build(model, v) for v in names}
        for batch in batches:
            classes, seeds = torch.arange(batch) % model.config.num_classes, torch.arange(batch)
            tokens = {v: b.sample(classes, seeds, settings) for v, b in backends.items()}  # capture + warm
            times = {v: [] for v in names}
            for _ in range(args.rounds):
                for v, b in backends.items():
                    times[v].append(b.phase_times(batch, settings)["replays_us_per_step"])
            row = {"us_per_step": {v: min(t) for v, t in times.items()}, "all": times,
                   "tokens_equal_to_first": {v: bool(torch.equal(tokens[v], tokens[names[0]])) for v in names}}
            ops = {}
            for v in args.op_times.split(","):
                if v in backends:
                    timing = backends[v].op_timings(batch, settings)["ops"]
                    ops[v] = {k: round(t["us_per_launch"], 3) for k, t in timing.items()}
            row["op_us"] = ops
            result["cases"][f"{model_name} b{batch}"] = row
            print(f"{model_name} b{batch}: " + ", ".join(f"{v} {row['us_per_step'][v]:.1f}" for v in names)
                  + f" µs per step; tokens equal: {row['tokens_equal_to_first']}", flush=True)
            for v, o in ops.items():
                print(f"  ops {v}: " + ", ".join(f"{k} {t:.2f}" for k, t in o.items()), flush=True)
        del backends, model
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gemv_pre_bench.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
