"""Where aim_cfg_sample's time goes inside a CUDA graph: the kernel cut off after each stage (a copy of the source
with an early return that writes the stage's result, so the compiler keeps its work), each cut timed as
sampler_bench times the kernel (a graph of 200 launches, bf16, vocabulary 16384, official settings, no advance).
The differences between consecutive cuts are the stages' costs in the setting the decode step runs them.

    PYTHONPATH=. python scripts/sampler_stops.py --source plugins/aim_kernels.cu --out results/
    git show e5bacd0:plugins/aim_kernels.cu > old.cu; ... --source old.cu    (that kernel's cuts)

The cuts are inserted at fixed anchors of the source: e5bacd0's kernel, or the kernel since 289164d (no top-k
bound stage); a missing anchor stops the script.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

from sampler_bench import OldSampler, time_graph  # noqa: E402

from aim_rt.plugins.kernels import Kernels  # noqa: E402
from aim_rt.sampling import SamplingSettings  # noqa: E402

STAGES = {0: "launch and wait", 1: "load, mix, max/min", 2: "top-k bound from the threads' maxima",
          3: "bins, histogram, top-k bin", 4: "list of survivors", 5: "top-k resolved", 6: "top-p cut", 7: "draw",
          99: "next input (the whole kernel)"}


def is_e5bacd0(src: str) -> bool:
    """e5bacd0's kernel (its teacher token went through shared memory) rather than the one since 289164d."""
    return "sh.teacher_tok = teacher_tok" in src


def stages(src: str) -> dict:
    return STAGES if is_e5bacd0(src) else {n: name for n, name in STAGES.items() if n != 2}


def insert(s: str, anchor: str, add: str, before: bool = False) -> str:
    if s.count(anchor) != 1:
        raise SystemExit(f"anchor not found exactly once: {anchor!r}")
    return s.replace(anchor, (add + anchor) if before else (anchor + add))


def cut_source(src: str, n: int) -> str:
    def stop(m: int, value: str) -> str:
        return (f"\nif (SAMPLE_STOP == {m}) {{ if (tid == 0) p.tokens[(long long)b * p.num_tokens] = "
                f"(long long)({value}); return; }}\n")

    if is_e5bacd0(src):
        s = insert(src, "  if (tid == 0) { sh.nc = 0; sh.token = V; }", stop(0, "k"), before=True)
        s = insert(s, "  if (tid == 0) { sh.u = uniform(seed, k); sh.teacher_tok = teacher_tok; }  // read after "
                      "later __syncthreads\n", stop(1, "__float_as_int(map.mx) ^ map.kmn"))
        s = insert(s, "    unsigned pk[MAX_PER / 2];  // bins, two per register\n", stop(2, "blimit"), before=True)
    else:
        s = insert(src, "  if (tid == 0) { sh.nc = 0; sh.token = V; sh.k = k_load; sh.seed = seed_load; }",
                   stop(0, "k_load"), before=True)
        s = insert(s, "  if (tid == 0) sh.u = uniform(sh.seed, k);  // read after later __syncthreads\n",
                   stop(1, "__float_as_int(map.mx) ^ map.kmn"))
    s = insert(s, "    rs.need = (unsigned long long)p.top_k - sh.sel.above;\n", stop(3, "bstar + rs.need"))
    s = insert(s, "  // 3-5. resolve top-k, top-p, draw", stop(4, "n + (int)lkey[0]"), before=True)
    s = insert(s, "  if (rs.topk) kth = sh.key;\n", "  if (SAMPLE_STOP == 5) { if (tid == 0) sh.token = kth; return; }\n")
    s = insert(s, "  // inverse CDF in vocabulary order", "  if (SAMPLE_STOP == 6) { if (tid == 0) sh.token = cut; "
                  "return; }\n", before=True)
    s = insert(s, "  // `tokens` records the draw;", "  if (SAMPLE_STOP >= 5 && SAMPLE_STOP <= 7) { if (tid == 0) "
                  "p.tokens[(long long)b * p.num_tokens] = sh.token; return; }\n", before=True)
    return f"#define SAMPLE_STOP {n}\n" + s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", type=Path, required=True, help="an aim_kernels.cu (e5bacd0's, or 289164d's on)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smem", type=int, default=4096 * 8 + 4096 * 6, help="that kernel's dynamic shared memory")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    src = a.source.read_text()
    torch.zeros(1, device="cuda")  # a context for the module loads
    advance = Kernels("bfloat16")
    cuts = {}
    for n in stages(src):
        path = a.out / f"sampler_stop{n}.cu"
        path.write_text(cut_source(src, n))
        cuts[n] = OldSampler("bfloat16", path, a.smem)
    report = {"device": torch.cuda.get_device_name(), "stages": stages(src), "us": {}}
    lines = [report["device"]]
    for batch in (1, 16):
        for kind in ("normal", "gumbel"):
            times: dict[int, list[float]] = {}
            for _ in range(a.rounds):  # alternating, the minimum of the rounds
                for n, kern in cuts.items():
                    times.setdefault(n, []).append(time_graph(kern, advance, batch, SamplingSettings(), kind, 200,
                                                              with_advance=False))
            best = {n: min(v) for n, v in times.items()}
            report["us"][f"b{batch} {kind}"] = best
            prev, parts = 0.0, []
            for n, t in best.items():
                parts.append(f"{STAGES[n]} {t - prev:+.2f}")
                prev = t
            lines.append(f"batch {batch} {kind}: whole {best[99]:.2f} µs; " + ", ".join(parts))
            print(lines[-1], flush=True)
    (a.out / "sampler_stops.json").write_text(json.dumps(report, indent=1))
    (a.out / "sampler_stops.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
