"""What would a decode step cost without one kind of kernel? A bound, measured: the same backend with every
launch of that kind left out of the captured step (e.g. `residual_norm`: what folding the residual norm into
its neighbours could at best save; `selective_state_update`: what a free state update would). Variants
alternate in one process. A step missing an op computes garbage: only its time means anything.
A variant may also name a build (`early_sample`: the sampler lets the next step's first kernel launch at once
at every batch, PDL_EARLY_SAMPLE), which does compute the model: its tokens are compared with the first
variant's (`full` by default).

    PYTHONPATH=. python scripts/op_drop_bound.py --out results/drop --cases AiM-B:1,AiM-B:16,AiM-XL:1
"""

from __future__ import annotations

import argparse
from pathlib import Path

# variant: (kinds of op left out, extra -D of the step/sampler build)
VARIANTS = {
    "full": ((), {}),
    "no_norm": (("residual_norm",), {}),
    "no_ssu": (("selective_state_update",), {}),
    "no_norm_ssu": (("residual_norm", "selective_state_update"), {}),
    "early_sample": ((), {"PDL_EARLY_SAMPLE": 1 << 30}),
}


def main() -> None:
    from aim_rt.bench import run_study
    from aim_rt.cuda_backend import CudaBackend
    from aim_rt.plugins.kernels import Kernels

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

    def backends(model):
        made, cfg = {}, model.config
        for v in args.variants.split(","):
            drop, defines = VARIANTS[v]
            b = made[v] = Dropping(model)
            b.drop = drop
            if defines:
                b.kernels = Kernels("bfloat16", 0, gemv_depths=(cfg.d_model, cfg.d_inner), d_model=cfg.d_model,
                                    defines=defines)
        return made

    run_study(args.cases, backends, args.rounds, args.out / "op_drop_bound.json")


if __name__ == "__main__":
    main()
