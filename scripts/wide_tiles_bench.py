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
from pathlib import Path

VARIANTS = {"narrow16": 16, "rule": None, "wide": 0}  # name: gemv_narrow_rows (None: the build's own)


def main() -> None:
    from aim_rt.bench import run_study
    from aim_rt.cuda_backend import CudaBackend

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default="AiM-B:1,AiM-L:1,AiM-XL:1,AiM-XL:2,AiM-XL:4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="narrow16,rule,wide")
    args = ap.parse_args()

    def backends(model):
        made = {}
        for v in args.variants.split(","):
            b = made[v] = CudaBackend(model)
            if VARIANTS[v] is not None:
                b.kernels.gemv_narrow_rows = VARIANTS[v]
        return made

    run_study(args.cases, backends, args.rounds, args.out / "wide_tiles_bench.json")


if __name__ == "__main__":
    main()
