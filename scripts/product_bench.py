"""The decode step's products above 32 rows (cuBLAS today), by call form: which one cuBLAS runs fastest.

    PYTHONPATH=. python scripts/product_bench.py [--out results/]

For each (model, rows, product) a CUDA graph of one product per layer, each layer with its own weights (so they
come from DRAM, as in the step), replayed; µs per product (median of 7 replays) and the share of copy bandwidth
(weights + x + y). Forms: `mm_t` torch.mm(x, w.t()) (what the backend does), `mm_nn` torch.mm(x, w_t) with the
weight stored transposed (k, n), `addmm` torch.addmm(zero bias, x, w.t()) (cuBLASLt's bias epilogue), `halves`
two mm_t calls of half the rows, `gemv2` our aim_gemv on two halves of the rows (where an instance fits), `lt` and
`lt_tuned` cuBLASLt through nvmath-python (the heuristic's first algorithm, or the fastest of 16 by its autotune;
only where nvmath-python is installed), `gemm` our aim_gemm (33-128 rows, Hopper).
(62488e8 and 8c83616 also had `gemm`, the reverted aim_gemm: see bench/results/README.md.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from aim_rt.bench import copy_bandwidth, replay_us
from aim_rt.config import preset

torch.backends.cuda.matmul.allow_tf32 = False


LT_CHOICES: dict = {}  # (rows, n, k, tuned) -> the algorithm nvmath chose (tile, split-k, ...)


def lt_product(x, w, y, tune):
    """y = x @ w.T by cuBLASLt through nvmath-python (in place into y), its algorithm the heuristic's first or,
    with `tune`, the fastest of up to 16 (nvmath's autotune); None where nvmath is missing or fails."""
    try:
        from nvmath.linalg.advanced import Matmul, MatmulOptions, MatmulPlanPreferences
    except ImportError:
        return None
    stream = torch.cuda.current_stream()
    try:
        mm = Matmul(x, w.t(), c=y, beta=0.0, options=MatmulOptions(inplace=True), stream=stream)
        mm.plan(preferences=MatmulPlanPreferences(limit=16), stream=stream)
        if tune:
            mm.autotune(iterations=5, stream=stream)
        alg = mm.algorithms[0]
        LT_CHOICES[(x.shape[0], w.shape[0], w.shape[1], tune)] = {
            "tile": str(alg.tile), "split_k": int(alg.split_k), "stages": str(alg.stages),
            "reduction": str(alg.reduction_scheme), "algorithm_id": int(alg.algorithm_id)}
    except Exception as e:  # noqa: BLE001 - reported, the other forms still run
        LT_CHOICES[(x.shape[0], w.shape[0], w.shape[1], tune)] = {"error": repr(e)[:300]}
        return None
    return lambda: mm.execute(stream=torch.cuda.current_stream())


def forms(x, w, wt, bias, y, kernels):
    rows = x.shape[0]
    h = rows // 2
    out = {
        "mm_t": lambda: torch.mm(x, w.t(), out=y),
        "mm_nn": lambda: torch.mm(x, wt, out=y),
        "addmm": lambda: torch.addmm(bias, x, w.t(), out=y),
        "halves": lambda: (torch.mm(x[:h], w.t(), out=y[:h]), torch.mm(x[h:], w.t(), out=y[h:])),
    }
    for name, tune in (("lt", False), ("lt_tuned", True)):  # cuBLASLt through nvmath-python (if installed)
        mm = lt_product(x, w, y, tune)
        if mm is not None:
            out[name] = mm
    if kernels is not None:
        from aim_rt.plugins.kernels import gemv_params, gemv_supported

        if kernels.gemm_supported(rows, x.shape[1]):
            from aim_rt.plugins.kernels import gemm_params, gemm_splits

            pg = gemm_params(x, w, y, gemm_splits(w.shape[0], x.shape[1], kernels.gemm_ctas))
            out["gemm"] = lambda: kernels.gemm(pg, torch.cuda.current_stream().cuda_stream)
        if gemv_supported("bfloat16", h, x.shape[1]):
            p0, p1 = gemv_params(x[:h], w, y[:h]), gemv_params(x[h:], w, y[h:])
            stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
            out["gemv2"] = lambda: (kernels.gemv(p0, stream()), kernels.gemv(p1, stream()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--models", default="AiM-B,AiM-XL")
    ap.add_argument("--rows", default="64,128")
    args = ap.parse_args()
    from aim_rt.plugins.kernels import Kernels

    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    report = {"device": torch.cuda.get_device_name(), "copy_GBps": bw / 1e9, "cases": {}}
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    for name in args.models.split(","):
        cfg = preset(name)
        kernels = Kernels("bfloat16", gemv_depths=(cfg.d_model, cfg.d_inner), d_model=cfg.d_model)
        for prod, (n, k) in {"in_proj": (cfg.d_in_proj, cfg.d_model), "out_proj": (cfg.d_model, cfg.d_inner)}.items():
            layers = cfg.n_layer
            ws = [torch.randn(n, k, device=dev).mul_(k ** -0.5).to(torch.bfloat16) for _ in range(layers)]
            wts = [w.t().contiguous() for w in ws]
            bias = torch.zeros(n, device=dev, dtype=torch.bfloat16)
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, k, device=dev).to(torch.bfloat16)
                ys = [torch.empty(rows, n, device=dev, dtype=torch.bfloat16) for _ in range(layers)]
                calls = [forms(x, ws[i], wts[i], bias, ys[i], kernels) for i in range(layers)]
                ref = (x.float() @ ws[0].float().t())
                row = {}
                for form in calls[0]:
                    for _ in range(2):
                        for c in calls:
                            c[form]()
                    torch.cuda.synchronize()
                    err = ((ys[0].float() - ref).abs().max() / ref.abs().max()).item()
                    g = torch.cuda.CUDAGraph()
                    try:
                        with torch.cuda.graph(g):
                            for c in calls:
                                c[form]()
                    except Exception as e:  # noqa: BLE001 - a form that cannot be captured is reported
                        print(f"  {form}: not captured: {e!r}"[:300], flush=True)
                        torch.cuda.synchronize()
                        continue
                    us = replay_us(g, layers, replays=7)
                    moved = (n * k + rows * (k + n)) * 2
                    row[form] = {"us": us, "of_copy": moved / (us * 1e-6) / bw, "rel_err": err}
                key = f"{name} {prod} rows {rows} ({n}x{k})"
                report["cases"][key] = row
                print(f"{key}: " + ", ".join(f"{f} {r['us']:.2f} µs ({r['of_copy']:.0%}, err {r['rel_err']:.1e})"
                                             for f, r in row.items()), flush=True)
    report["lt_choices"] = {f"rows {r} {n}x{k} {'tuned' if t else 'heuristic'}": v for (r, n, k, t), v in LT_CHOICES.items()}
    for key, v in report["lt_choices"].items():
        print(f"  cuBLASLt {key}: {v}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "product_bench.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
