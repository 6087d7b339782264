"""aim_gemv's wide column tiles (GEMV_WIDE: 2-4 eight-column tiles per block) above a number of rows (a
Kernels' gemv_narrow_rows: 16, the backend's rule for the model, or 0 = from one row), against each other:
whole decode steps of backends that differ only in that, alternating in one process, tokens compared (a
product's bits do not depend on its instance). The first two runs (2026-12-03) compared 16 ("narrow") with 0
("wide") by setting the module's GEMV_NARROW_ROWS while each backend captured its graphs. Wider tiles mean
fewer, larger blocks: at AiM-XL batch 1 in_proj's 806 one-tile blocks do not all fit on the SMs at once (a second
wave loads its weights after the first), 403 two-tile blocks might.

    PYTHONPATH=. python scripts/wide_tiles_bench.py --out results/wide --cases AiM-XL:1,AiM-XL:4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

VARIANTS = {"narrow16": 16, "rule": None, "wide": 0}  # name: gemv_narrow_rows (None: the build's own)


def main() -> None:
    from aim_rt.bench import _model, alternate_steps, step_study
    from aim_rt.cuda_backend import CudaBackend
    from aim_rt.sampling import SamplingSettings

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default="AiM-B:1,AiM-L:1,AiM-XL:1,AiM-XL:2,AiM-XL:4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="narrow16,rule,wide")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    settings = SamplingSettings()
    result, models = step_study(args.cases, dev)
    variants = {v: VARIANTS[v] for v in args.variants.split(",")}
    for model_name, batches in models.items():
        model, _ = _model(model_name, dev, "bfloat16", precompile=True)
        backends = {v: CudaBackend(model) for v in variants}
        for v, b in backends.items():
            if variants[v] is not None:
                b.kernels.gemv_narrow_rows = variants[v]
        for batch in batches:
            classes, seeds = torch.arange(batch) % model.config.num_classes, torch.arange(batch)
            tokens = {v: b.sample(classes, seeds, settings) for v, b in backends.items()}  # capture + warm
            times = alternate_steps(backends, batch, settings, args.rounds)
            row = {"us_per_step": {v: min(t) for v, t in times.items()}, "all": times,
                   "tokens_equal": all(torch.equal(t, next(iter(tokens.values()))) for t in tokens.values())}
            result["cases"][f"{model_name} b{batch}"] = row
            print(f"{model_name} b{batch}: " + ", ".join(f"{v} {row['us_per_step'][v]:.1f}" for v in variants)
                  + f" µs per step; tokens equal: {row['tokens_equal']}", flush=True)
        del backends, model
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wide_tiles_bench.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
