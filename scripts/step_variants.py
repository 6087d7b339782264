"""The decode step's kernel table for several build variants, each in its own process, in one device run:
what programmatic dependent launch (AIM_RT_PDL; AIM_RT_PDL_EARLY_ROWS: up to how many rows the next kernel
launches at once, not at PDL_WAIT; pdl-late / pdl-early: never / always) and the skinny tensor-core products
(AIM_RT_GEMV, their column tiles AIM_RT_GEMV_WIDE) gain. A variant named twice runs twice (its second run is
labelled name#2), e.g. alternating: --variants pdl-late,pdl-early,pdl-late,pdl-early.

    PYTHONPATH=. python scripts/step_variants.py --out results/ --models AiM-B,AiM-XL --batches 1,16,64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # name: environment
    "pdl+gemv": {"AIM_RT_PDL": "1", "AIM_RT_GEMV": "1"},
    "pdl-late": {"AIM_RT_PDL": "1", "AIM_RT_GEMV": "1", "AIM_RT_PDL_EARLY_ROWS": "0"},
    "pdl-early": {"AIM_RT_PDL": "1", "AIM_RT_GEMV": "1", "AIM_RT_PDL_EARLY_ROWS": "1000000"},
    "pdl+gemv16": {"AIM_RT_PDL": "1", "AIM_RT_GEMV": "1", "AIM_RT_GEMV_ROWS": "16"},
    "wide2": {"AIM_RT_PDL": "1", "AIM_RT_GEMV": "1", "AIM_RT_GEMV_WIDE": "3:2,6:1"},
    "gemv": {"AIM_RT_PDL": "0", "AIM_RT_GEMV": "1"},
    "cublas": {"AIM_RT_PDL": "0", "AIM_RT_GEMV": "0"},
}


def child(models: list[str], batches: list[int], out: Path) -> None:
    import torch

    from aim_rt.bench import format_kernel_table, kernel_table

    torch.backends.cuda.matmul.allow_tf32 = False
    table = kernel_table(models, batches)
    out.with_suffix(".json").write_text(json.dumps(table, indent=1) + "\n")
    out.with_suffix(".txt").write_text(format_kernel_table(table) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="AiM-B,AiM-XL")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    models, batches = args.models.split(","), [int(b) for b in args.batches.split(",")]
    if args.child:
        child(models, batches, args.child)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"date": time.strftime("%Y-%m-%d"), "variants": {}}
    runs: list[tuple[str, str]] = []  # (label, variant): a repeated variant gets label name#2, name#3, ...
    for name in args.variants.split(","):
        count = sum(v == name for _, v in runs) + 1
        runs.append((name if count == 1 else f"{name}#{count}", name))
    for name, variant in runs:
        t0 = time.time()
        path = args.out / f"kernels_{name.replace('+', '_').replace('#', '_')}"
        r = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--models", args.models,
                            "--batches", args.batches, "--child", str(path)],
                           env={**os.environ, **VARIANTS[variant]}, capture_output=True, text=True)
        if r.returncode:
            print(f"{name}: failed\n{r.stderr[-3000:]}", flush=True)
            summary["variants"][name] = {"error": r.stderr[-3000:]}
            continue
        table = json.loads(path.with_suffix(".json").read_text())
        summary["device"] = table["device"]
        summary["variants"][name] = {f"{row['model']} b{row['batch']}": row["step_us_graph"] for row in table["rows"]}
        print(f"{name} ({time.time() - t0:.0f} s):", json.dumps(summary["variants"][name]), flush=True)
    names = [n for n in summary["variants"] if "error" not in summary["variants"][n]]
    if names:
        print("µs per step (graph replay, whole sample / tokens)")
        print(f"{'case':<34}" + "".join(f"{n:>12}" for n in names))
        for case in summary["variants"][names[0]]:
            print(f"{case:<34}" + "".join(f"{summary['variants'][n].get(case, float('nan')):12.1f}" for n in names))
    (args.out / "step_variants.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
