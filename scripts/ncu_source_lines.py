"""Warp instructions per source line from ncu's SASS source page, the lines taken from the cubin that ran.

    python scripts/ncu_source_lines.py src.csv.gz kernel.cubin plugins/aim_kernels.cu BLOCKS [--kernel aim_cfg_sample]

src.csv.gz: `ncu -i REP --page source --csv --print-source sass`; kernel.cubin: the cubin the profiled process
loaded (the kernel cache, $AIM_RT_CACHE/kernels), disassembled with `nvdisasm -g` (on PATH or $NVDISASM) so
that each SASS offset maps to its source line; a cubin whose instructions differ from the profile is refused.
Prints the warp instructions per block (BLOCKS: the grid size), the opcode mix and the top source lines.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import os
import re
import shutil
import subprocess


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("cubin")
    ap.add_argument("source")
    ap.add_argument("blocks", type=int)
    ap.add_argument("--kernel", default="aim_cfg_sample")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--metric", default="Instructions Executed",
                    help="the source page's column to add up per line, e.g. 'Warp Stall Sampling (All Samples)'")
    a = ap.parse_args()
    rows = list(csv.reader(gzip.open(a.csv, "rt") if a.csv.endswith(".gz") else open(a.csv)))
    hdr, data = rows[1], rows[2:]
    if a.metric not in hdr:
        raise SystemExit(f"no column {a.metric!r}; the page has: {hdr}")
    ia, isrc, iex = hdr.index("Address"), hdr.index("Source"), hdr.index(a.metric)
    base = int(data[0][ia], 16)
    prof = {int(r[ia], 16) - base: (r[isrc].strip(), float((r[iex] or "0").replace(",", ""))) for r in data}
    total = sum(e for _, e in prof.values())
    ops = collections.Counter()
    for text, e in prof.values():
        t = text.split()
        ops[(t[1] if t and t[0].startswith("@") else t[0]).split(".")[0] if t else "?"] += e
    print(f"{a.metric}: {total / a.blocks:.0f} per block; by opcode: "
          + ", ".join(f"{o} {v / a.blocks:.0f}" for o, v in ops.most_common(8)))
    nvdisasm = os.environ.get("NVDISASM") or shutil.which("nvdisasm") or "nvdisasm"
    sass = subprocess.run([nvdisasm, "-c", "-g", a.cubin], capture_output=True, text=True, check=True).stdout
    marker = f".text.{a.kernel}:"
    if marker not in sass:
        raise SystemExit(f"{a.cubin} has no {a.kernel}")
    section = sass[sass.index(marker):]
    where, line = {}, None
    for text in section.splitlines():
        m = re.search(r"line (\d+)", text)
        if m:
            line = int(m.group(1))
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", text)
        if m:
            where[int(m.group(1), 16)] = (line, m.group(2).strip())
    if any(off in where and where[off][1].split()[0] != text.split()[0] for off, (text, _) in prof.items()):
        raise SystemExit("the cubin's instructions differ from the profile's: not the cubin that ran")
    per_line = collections.Counter()
    for off, (_, e) in prof.items():
        per_line[where.get(off, (None,))[0]] += e
    src = open(a.source).read().splitlines()
    for ln, e in per_line.most_common(a.top):
        print(f"  {e / a.blocks:6.1f} {100 * e / total:4.1f}%  {ln}: {src[ln - 1].strip()[:100] if ln else ''}")


if __name__ == "__main__":
    main()
