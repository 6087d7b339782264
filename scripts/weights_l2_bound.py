"""How much of a decode step is the products' weight traffic? A bound, measured: the same backend with every
layer's in_proj (and/or out_proj) pointing at layer 0's matrix, so that after the first layer the products read
their weights from L2 instead of DRAM. The step time then shows what a product whose weights were already on
chip (e.g. fetched into shared memory before its PDL wait) could at best save. Variants alternate in one process.
The shared-weight steps compute a different model: only their times mean anything.

    PYTHONPATH=. python scripts/weights_l2_bound.py --out results/l2bound --cases AiM-B:1,AiM-XL:1,AiM-XL:16
"""

from __future__ import annotations

import argparse
from pathlib import Path


VARIANTS = {"own": (), "shared_in": ("in_proj",), "shared_out": ("out_proj",), "shared_both": ("in_proj", "out_proj")}


def main() -> None:
    from aim_rt.bench import run_study
    from aim_rt.cuda_backend import CudaBackend

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default="AiM-B:1,AiM-B:16,AiM-XL:1,AiM-XL:16")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    def backends(model):
        made = {}
        for variant, kinds in VARIANTS.items():
            b = made[variant] = CudaBackend(model)
            for layer in b._params[1:]:
                for kind in kinds:
                    layer[kind] = b._params[0][kind]
        return made

    run_study(args.cases, backends, args.rounds, args.out / "weights_l2_bound.json")


if __name__ == "__main__":
    main()
