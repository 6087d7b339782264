"""Cold start, variants alternating, each from an emptied page cache and an empty kernel cache: what a fresh
machine's first process sees, repeatable within one call (needs root for /proc/sys/vm/drop_caches).

    sudo PYTHONPATH=. python scripts/cold_start_ab.py --rounds 3 --out results/

Variants: `early` (scripts/cold_start.py: the order `aim-rt generate` takes), `plain` (--plain), `no-warmup`
(--no-cudnn-warmup: cuDNN loaded at the first decode). (b5b6cab
also had a library readahead, measured here and dropped: see bench/results/README.md.) Before each run: sync, drop the page cache (and dentries, inodes), remove the
driver's compute cache (~/.nv) and give the run a new AIM_RT_CACHE. Writes cold_start_ab.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"early": ({}, []), "plain": ({}, ["--plain"]), "no-warmup": ({}, ["--no-cudnn-warmup"])}
FIELDS = ("imports", "random AiM-B built", "step kernels ready", "16 images' tokens", "done at")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    shutil.rmtree(Path.home() / ".nv", ignore_errors=True)


def run(variant: str) -> dict:
    env_extra, argv = VARIANTS[variant]
    drop_caches()
    env = dict(os.environ, AIM_RT_CACHE=tempfile.mkdtemp(prefix="aimrt-cold-"), **env_extra)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "cold_start.py"), *argv], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if out.returncode or "cold start" not in line:
        raise SystemExit(f"{variant} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    times = {f: float(re.search(re.escape(f) + r"\D*([\d.]+) s", line).group(1)) for f in FIELDS}
    print(f"{variant:>13}: " + ", ".join(f"{f} {t:.2f}" for f, t in times.items()), flush=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="early,plain")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("cold_start_ab.py drops the page cache: run it as root")
    names = args.variants.split(",")
    runs = {v: [] for v in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]  # alternate which goes first
        for v in order:
            runs[v].append(run(v))
    summary = {v: {f: statistics.median(t[f] for t in runs[v]) for f in FIELDS} for v in names}
    lines = [f"{v:>13} (median of {args.rounds}): " + ", ".join(f"{f} {t:.2f} s" for f, t in s.items())
             for v, s in summary.items()]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cold_start_ab.json").write_text(json.dumps({"runs": runs, "median": summary}, indent=1))
        (args.out / "cold_start_ab.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
