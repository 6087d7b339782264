"""How much of a decode step is the products' weight traffic? A bound, measured: the same backend with every
layer's in_proj (and/or out_proj) pointing at layer 0's matrix, so that after the first layer the products read
their weights from L2 instead of DRAM. The step time then shows what a product whose weights were already on
chip (e.g. fetched into shared memory before its PDL wait) could at best save. Variants alternate in one process.
The shared-weight steps compute a different model: only their times mean anything.

    PYTHONPATH=. python scripts/weights_l2_bound.py --out results/l2bound --cases AiM-B:1,AiM-XL:1,AiM-XL:16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    from aim_rt.bench import _model, alternate_steps, step_study
    from aim_rt.cuda_backend import CudaBackend
    from aim_rt.sampling import SamplingSettings

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default="AiM-B:1,AiM-B:16,AiM-XL:1,AiM-XL:16")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    settings = SamplingSettings()
    result, models = step_study(args.cases, dev)
    for name, batches in models.items():
        model, _ = _model(name, dev, "bfloat16", precompile=True)
        backends = {}
        for variant, kinds in (("own", ()), ("shared_in", ("in_proj",)), ("shared_out", ("out_proj",)),
                               ("shared_both", ("in_proj", "out_proj"))):
            b = CudaBackend(model)
            for layer in b._params[1:]:
                for kind in kinds:
                    layer[kind] = b._params[0][kind]
            backends[variant] = b
        for batch in batches:
            classes, seeds = torch.arange(batch) % model.config.num_classes, torch.arange(batch)
            for b in backends.values():
                b.sample(classes, seeds, settings)  # capture + warm
            times = alternate_steps(backends, batch, settings, args.rounds)
            row = {v: min(t) for v, t in times.items()}
            row["all"] = times
            result["cases"][f"{name} b{batch}"] = row
            print(f"{name} b{batch}: " + ", ".join(f"{v} {row[v]:.1f}" for v in backends) + " µs per step",
                  flush=True)
        del backends, model
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "weights_l2_bound.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
