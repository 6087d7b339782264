"""Where aim_cfg_sample's time goes: the kernel rebuilt with %globaltimer stamps (thread 0 of block 0) at its
stage boundaries, launched alone on bf16 logits (vocabulary 16384, official settings), median over launches.

    PYTHONPATH=. python scripts/sampler_stages.py [--out results/]

The stamps are inserted into a copy of plugins/aim_kernels.cu at fixed anchors (the source itself has no
profiling hooks); a missing anchor stops the script.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from sampler_bench import OldSampler  # noqa: E402
from test_sampling_kernel import random_logits, run_sampler  # noqa: E402

from aim_rt.sampling import SamplingSettings  # noqa: E402

STAMP = ("if (threadIdx.x == 0 && blockIdx.x == 0) { unsigned long long t_; "
         "asm volatile(\"mov.u64 %0, %%globaltimer;\" : \"=l\"(t_)); aim_stamps[{i}] = t_; }")
# (anchor, stage that ends there): the stamp goes right after the anchor's first occurrence (before it for a
# comment)
ANCHORS = [
    ("PDL_WAIT(2 * p.batch, PDL_EARLY_SAMPLE);", "wait"),
    ("mn = -warp_max(lane < SAMPLE_WARPS ? -sh.fmn[lane] : -3.402823466e38f);", "load, mix, max/min"),
    ("blimit = sh.sel.bin;", "top-k bound from the threads' maxima"),
    ("const unsigned bstar = sh.sel.bin;", "bins, histogram, top-k bin"),
    ("  // 3-5. resolve top-k, top-p, draw", "list of survivors"),
    ("if (rs.topk) kth = sh.key;", "top-k resolved (in finish)"),
    ("  // inverse CDF in vocabulary order", "top-p cut"),
    ("  // `tokens` records the draw", "draw"),
    ("    p.next_input[(long long)(b + p.batch) * p.d + i] = e;\n  }", "next input"),
]


def instrumented_source(dst: Path) -> None:
    src = (ROOT / "plugins" / "aim_kernels.cu").read_text()
    fin = "template <int NPER, typename KeyOf>\n__device__ __forceinline__ void finish("  # above the kernel
    if fin not in src:
        raise SystemExit("anchor of finish() not found")
    src = src.replace(fin, "__device__ unsigned long long aim_stamps[16];\n" + fin, 1)
    for i, (anchor, _) in enumerate(ANCHORS):
        at = src.find(anchor)
        if at < 0:
            raise SystemExit(f"anchor not found: {anchor!r}")
        at += 0 if anchor.lstrip().startswith("//") else len(anchor)
        src = src[:at] + "\n" + STAMP.replace("{i}", str(i)) + src[at:]
    dst.write_text(src)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--launches", type=int, default=60)
    args = ap.parse_args()

    torch.zeros(1, device="cuda")  # the context OldSampler loads its module into
    tmp = Path(tempfile.mkdtemp()) / "aim_kernels_stamped.cu"
    instrumented_source(tmp)
    k = OldSampler("bfloat16", tmp, 57344)
    ptr, size = k.driver.cuModuleGetGlobal(k.module, b"aim_stamps")[1:]
    report = {"device": torch.cuda.get_device_name(), "stages": [s for _, s in ANCHORS], "cases": {}}
    for batch in (1, 16):
        for kind in ("normal", "gumbel"):
            g = torch.Generator(device="cuda").manual_seed(batch)
            logits = random_logits(kind, 2 * batch, 16384, g).to(torch.bfloat16)
            seeds = torch.arange(batch, device="cuda")
            deltas = []
            for i in range(args.launches):
                run_sampler(k, logits, seeds, i % 256, SamplingSettings(), d=768)
                torch.cuda.synchronize()
                host = (ctypes.c_uint64 * 16)()
                k.driver.cuMemcpyDtoH(host, ptr, 16 * 8)
                t = list(host)[: len(ANCHORS)]
                deltas.append([(t[j] - t[j - 1]) / 1e3 for j in range(1, len(ANCHORS))] + [(t[-1] - t[0]) / 1e3])
            med = [statistics.median(d[j] for d in deltas[5:]) for j in range(len(ANCHORS))]
            names = [s for _, s in ANCHORS[1:]] + ["total after the wait"]
            report["cases"][f"b{batch} {kind}"] = dict(zip(names, med))
            print(f"batch {batch} {kind}: " + ", ".join(f"{n} {v:.2f}" for n, v in zip(names, med)) + " (µs)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sampler_stages.json").write_text(json.dumps(report, indent=1))

if __name__ == "__main__":
    main()
