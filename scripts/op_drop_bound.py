"""What would a decode step cost without one kind of kernel? A bound, measured: the same backend with every
launch of that kind left out of the captured step (e.g. `residual_norm`: what folding the residual norm into
its neighbours could at best save; `selective_state_update`: what a free state update would). Variants
alternate in one process. A step missing an op computes garbage: only its time means anything.
A variant may also name a build (`early_sample`: the sampler lets the next step's first kernel launch at once
at every batch, PDL_EARLY_SAMPLE), which does compute the model: its tokens are compared with `full`'s.

    PYTHONPATH=. python scripts/op_drop_bound.py --out results/drop --cases AiM-B:1,AiM-B:16,AiM-XL:1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# variant: (kinds of op left out, extra -D of the step/sampler build)
VARIANTS = {
    "full": ((), {}),
    "no_norm": (("residual_norm",), {}),
    "no_ssu": (("selective_state_update",), {}),
    "no_norm_ssu": (("residual_norm", "selective_state_update"), {}),
    "early_sample": ((), {"PDL_EARLY_SAMPLE": 1 << 30}),
}


def main() -> None:
    from aim_rt.bench import _model, alternate_steps, step_study
    from aim_rt.cuda_backend import CudaBackend
    from aim_rt.plugins.kernels import Kernels
    from aim_rt.sampling import SamplingSettings

    class Dropping(CudaBackend):
        drop: tuple[str, ...] = ()

        def _ops(self, buf, settings):
            return [op for op in super()._ops(buf, settings) if op[0] not in self.drop]

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default="AiM-B:1,AiM-B:16,AiM-XL:1,AiM-XL:16")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    settings = SamplingSettings()
    result, models = step_study(args.cases, dev)
    names = args.variants.split(",")
    for name, batches in models.items():
        model, _ = _model(name, dev, "bfloat16", precompile=True)
        backends = {}
        for v in names:
            drop, defines = VARIANTS[v]
            b = Dropping(model)
            b.drop = drop
            if defines:
                cfg = model.config
                b.kernels = Kernels("bfloat16", 0, gemv_depths=(cfg.d_model, cfg.d_inner), d_model=cfg.d_model,
                                    defines=defines)
            backends[v] = b
        for batch in batches:
            classes, seeds = torch.arange(batch) % model.config.num_classes, torch.arange(batch)
            tokens = {v: b.sample(classes, seeds, settings) for v, b in backends.items()}  # capture + warm
            times = alternate_steps(backends, batch, settings, args.rounds)
            row = {v: min(t) for v, t in times.items()}
            row["all"] = times
            row["tokens_equal_full"] = {v: bool(torch.equal(tokens["full"], tokens[v]))
                                        for v in names if not VARIANTS[v][0] and v != "full" and "full" in names}
            result["cases"][f"{name} b{batch}"] = row
            print(f"{name} b{batch}: " + ", ".join(f"{v} {row[v]:.1f}" for v in backends) + " µs per step; tokens "
                  f"equal: {row['tokens_equal_full']}", flush=True)
        del backends, model
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "op_drop_bound.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
