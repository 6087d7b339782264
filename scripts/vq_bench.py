"""VQ decoder on the GPU, in one go: kernel checks, accuracy vs the fp32 reference, timing, profiles, cold start.

    PYTHONPATH=. python scripts/vq_bench.py --out DIR [--batches 1,16,64] [--budget 270]

Writes DIR/vq_bench.json (and profiles as text). Paths compared (bf16, VQ of the official VQConfig() shape with
random weights, seed 0):
  eager_nchw      the official code's way: bf16 NCHW eager, cudnn.benchmark on
  cl_graph        aim-rt's CudaBackend.decode before issue 11: bf16 channels_last, one CUDA graph per batch
  fast*           aim_rt.vq_fast.FastVQDecoder variants (graph per batch)
Accuracy: fp32 reference (TF32 off) vs bf16 eager and vs the fast decoder; PSNR on images clamped to [-1, 1],
peak-to-peak 2: 10 log10(4 / MSE). Batch invariance: an image decoded alone vs its row of a batch (bits).
Host-timed: the `aim-rt bench` VQ column's method (median of 20 synchronised perf_counter calls).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aim_rt.config import VQConfig  # noqa: E402
from aim_rt.vq import VQModel  # noqa: E402
from aim_rt.vq_fast import FastVQDecoder, _CudaOps, _TorchOps  # noqa: E402

T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.zeros(n, 3, size, size)
    for _ in range(6):
        f = torch.rand(n, 1, 2, generator=g) * 4 + 0.3
        ph = torch.rand(n, 3, 1, 1, generator=g) * 6.3
        amp = torch.randn(n, 3, 1, 1, generator=g) * 0.6
        img += amp * torch.sin(2 * math.pi * (f[..., 0, None, None] * xx + f[..., 1, None, None] * yy) + ph)
    return torch.tanh(img)


def metrics(got: torch.Tensor, ref: torch.Tensor) -> dict:
    got, ref = got.float(), ref.float()
    mse = (got.clamp(-1, 1) - ref.clamp(-1, 1)).pow(2).mean().item()
    return {"max_abs_diff": (got - ref).abs().max().item(), "psnr_db": 10 * math.log10(4 / max(mse, 1e-20)),
            "ref_max_abs": ref.abs().max().item()}


def time_fn(fn, iters: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return {"median_ms": ts[len(ts) // 2], "min_ms": ts[0], "iters": iters}


class ClGraph:
    """What CudaBackend.decode does (before issue 11): channels_last bf16 VQ, one CUDA graph per batch size."""

    def __init__(self, vq_bf16: VQModel):
        self.vq = copy.deepcopy(vq_bf16).to(memory_format=torch.channels_last)
        self.graphs = {}

    @torch.no_grad()
    def __call__(self, tokens):
        b = tokens.shape[0]
        if b not in self.graphs:
            static_in = tokens.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.vq.decode_checked(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.vq.decode_checked(static_in)
            self.graphs[b] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[b]
        static_in.copy_(tokens)
        graph.replay()
        return static_out.float().clone()


def official_vq(seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    with torch.device("cuda"):
        vq = VQModel(VQConfig())
    return vq.eval()


# ----- sections --------------------------------------------------------------------------------------
def kernel_checks(prev=None) -> dict:
    out = {}
    for vb, cb, mc in CONFIGS:
        out[f"vec_batch{vb}_chunk{cb >> 10}k_max{mc}"] = kernel_checks_one(vb, cb, mc)
    out["bandwidth_b16_256x256x128"] = kernel_bandwidth(prev)
    return out


def _diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


CONFIGS = [(4, 32 << 10, 256), (4, 64 << 10, 256), (4, 16 << 10, 512)]  # (vec_batch, chunk_bytes, max_chunks)


def kernel_checks_one(vec_batch: int, chunk_bytes: int, max_chunks: int) -> dict:
    from aim_rt.vq_fast import conv_out_weight

    k, t = _CudaOps(torch.bfloat16, torch.device("cuda"), vec_batch, chunk_bytes, max_chunks), _TorchOps()
    g = torch.Generator(device="cuda").manual_seed(1)
    out = {}
    for shape in [(2, 64, 64, 128), (3, 16, 16, 512), (1, 8, 8, 32), (2, 32, 32, 256), (1, 7, 9, 96), (5, 33, 31, 64)]:
        c = shape[-1]
        x = (torch.randn(*shape, device="cuda", generator=g) * 2 + 3).bfloat16()
        r = torch.randn(*shape, device="cuda", generator=g).bfloat16()
        bias = torch.randn(c, device="cuda", generator=g)
        norm = 1 + 0.1 * torch.randn(c, device="cuda", generator=g), torch.randn(c, device="cuda", generator=g)
        rec = {}
        try:
            o1, o2 = torch.empty_like(x), torch.empty_like(x)
            ak, sk = k.stats(x, norm, res=r, bias=bias, out=o1)
            at, st = t.stats(x, norm, res=r, bias=bias, out=o2)
            rec["stats_written_max_diff"] = _diff(o1, o2)
            rec["scale_rel_diff"] = ((ak - at).abs().max() / at.abs().max()).item()
            rec["shift_rel_diff"] = ((sk - st).abs().max() / st.abs().max()).item()
            o3 = x.clone()
            a3, s3 = k.stats(o3, norm, res=r, bias=bias, out=o3)  # in place, and the counters were reset
            rec["stats_inplace_repeat_equal"] = bool(torch.equal(o3, o1) and torch.equal(a3, ak) and torch.equal(s3, sk))
            for silu in (True, False):
                rec[f"apply_silu{int(silu)}_max_diff"] = _diff(k.apply(o1, ak, sk, silu), t.apply(o1, at, st, silu))
            a1, s1 = k.stats(x, norm, bias=bias)
            a2, s2 = t.stats(x, norm, bias=bias)
            rec["apply_biasfold_max_diff"] = _diff(k.apply(x, a1, s1, True), t.apply(x, a2, s2, True))
            o4 = torch.empty_like(x)
            k.stats(x, None, res=r, bias=bias, out=o4)
            rec["write_only_max_diff"] = _diff(o4, o2)
            rec["upsample_equal"] = bool(torch.equal(k.upsample(x), t.upsample(x)))
            y4 = torch.randn(shape[0], shape[1] + 1, shape[2] + 1, 4 * c, device="cuda", generator=g).bfloat16()
            h1, (a1, s1) = k.subpixel_stats(y4, bias, norm)
            h2, (a2, s2) = t.subpixel_stats(y4, bias, norm)
            rec["subpixel_max_diff"] = _diff(h1, h2)
            rec["subpixel_scale_rel_diff"] = ((a1 - a2).abs().max() / a2.abs().max()).item()
            if k.conv_out_supported(c, 3):
                w = torch.randn(3, c, 3, 3, device="cuda", generator=g) / (3 * c ** 0.5)
                cb = torch.randn(3, device="cuda", generator=g)
                got = k.conv_out(o1, ak, sk, conv_out_weight(w, torch.bfloat16), cb, 3)
                ref = t.conv_out(o1, ak, sk, w.bfloat16(), cb, 3)
                rec["conv_out_max_diff"] = _diff(got, ref)
                rec["conv_out_ref_max_abs"] = ref.abs().max().item()
        except Exception:  # noqa: BLE001
            rec["error"] = traceback.format_exc()
        out[str(shape)] = rec
    torch.cuda.synchronize()
    return out


def kernel_bandwidth(prev=None) -> dict:
    """Each op alone on the largest activation (16 x 256 x 256 x 128 bf16, 268 MB), CUDA-event timed; the
    statistics ops also on one image of it (`*_b1`: where the last block's combine showed) and on one 16x16x512
    image (`*_b1_16x16x512`: the smallest activation). `prev`: the earlier module's ops ("wave" chunking) too."""
    from aim_rt.vq_fast import conv_out_weight

    res = {}
    try:
        shape = (16, 256, 256, 128)
        nbytes = math.prod(shape) * 2
        g = torch.Generator(device="cuda").manual_seed(5)
        x = torch.randn(*shape, device="cuda", generator=g).bfloat16()
        r = torch.randn(*shape, device="cuda", generator=g).bfloat16()
        o = torch.empty_like(x)
        bias = torch.randn(128, device="cuda")
        norm = torch.ones(128, device="cuda"), torch.zeros(128, device="cuda")
        y4 = torch.randn(16, 129, 129, 512, device="cuda", generator=g).bfloat16()
        w = conv_out_weight(torch.randn(3, 128, 3, 3, device="cuda") * 0.03, torch.bfloat16)
        x1, r1, o1, y1 = x[:1].clone(), r[:1].clone(), o[:1].clone(), y4[:1].clone()
        xs, rs = x1.reshape(1, 16, 16, -1)[..., :512].contiguous(), r1.reshape(1, 16, 16, -1)[..., :512].contiguous()
        os_, bs, ns = torch.empty_like(xs), torch.randn(512, device="cuda"), (torch.ones(512, device="cuda"),
                                                                              torch.zeros(512, device="cuda"))
        ops = [(f"vb{vb}_chunk{cb >> 10}k_max{mc}", _CudaOps(torch.bfloat16, torch.device("cuda"), vb, cb, mc))
               for vb, cb, mc in CONFIGS]
        if prev is not None:
            ops.append(("prev_wave", prev._CudaOps(torch.bfloat16, torch.device("cuda"), 4, "wave")))
        for tag, k in ops:
            a, s = k.stats(x, norm, bias=bias)
            cases = {"torch_clone": (lambda: x.clone(), 2),
                     "stats_read": (lambda: k.stats(x, norm, bias=bias), 1),
                     "stats_res_write": (lambda: k.stats(x, norm, res=r, bias=bias, out=o), 3),
                     "apply_silu": (lambda: k.apply(x, a, s, True), 2),
                     "subpixel_stats": (lambda: k.subpixel_stats(y4, bias, norm), 2),
                     "conv_out": (lambda: k.conv_out(x, a, s, w, bias[:3], 3), 1),
                     "stats_read_b1": (lambda: k.stats(x1, norm, bias=bias), 1 / 16),
                     "stats_res_write_b1": (lambda: k.stats(x1, norm, res=r1, bias=bias, out=o1), 3 / 16),
                     "subpixel_stats_b1": (lambda: k.subpixel_stats(y1, bias, norm), 2 / 16),
                     "stats_res_write_b1_16x16x512": (lambda: k.stats(xs, ns, res=rs, bias=bs, out=os_), 3 / 256)}
            for name, (fn, units) in cases.items():
                if tag == "prev_wave" and name in ("torch_clone", "apply_silu", "conv_out"):
                    continue
                tm = time_fn(fn, 20, warmup=3)
                key = f"{tag}_{name}"
                res[key] = {"median_ms": tm["median_ms"], "tb_per_s": units * nbytes / tm["median_ms"] / 1e9}
                log("bandwidth", key, res[key])
    except Exception:  # noqa: BLE001
        res["error"] = traceback.format_exc()
    return res


def accuracy(vq32: VQModel, vq16: VQModel, variants: dict, prev=None) -> dict:
    res = {}
    imgs = smooth_images(16, 256, seed=2).cuda()
    with torch.no_grad():
        tok_enc = vq32.encode_tokens(imgs)
    tok_rand = torch.randint(0, vq32.config.n_embed, (16, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    res["encoded_tokens_unique"] = int(tok_enc.unique().numel())
    decs = {name: FastVQDecoder(vq32, torch.bfloat16, **kw) for name, kw in variants.items()}
    if prev is not None:
        decs["prev"] = prev.FastVQDecoder(vq32, torch.bfloat16)
    for tname, tok in (("encoded_smooth", tok_enc), ("random", tok_rand)):
        with torch.no_grad():
            ref = vq32.decode_checked(tok)
            r = {"bf16_eager": metrics(vq16.decode_checked(tok), ref)}
            r["encoder_input_vs_ref"] = metrics(imgs, ref) if tname == "encoded_smooth" else None
            for name, d in decs.items():
                r[name] = metrics(d(tok), ref)
        res[tname] = r
    # the embedded digits VQ (ch 32, ch_mult 1,1,1: 32x32 images from 8x8 tokens)
    try:
        from aim_rt.loading import load_vq

        d32 = load_vq(ROOT / "aim_rt" / "data" / "digits", device="cuda")
        d16 = copy.deepcopy(d32).bfloat16()
        n = d32.config.n_embed
        toks = {"random": torch.randint(0, n, (16, 64), device="cuda")}
        if hasattr(d32, "encoder"):
            with torch.no_grad():
                toks["encoded_smooth"] = d32.encode_tokens(smooth_images(16, 32, seed=4).cuda())
        dr = {}
        for tname, tok in toks.items():
            with torch.no_grad():
                ref = d32.decode_checked(tok)
                dr[tname] = {"bf16_eager": metrics(d16.decode_checked(tok), ref),
                             "fast": metrics(FastVQDecoder(d32, torch.bfloat16)(tok), ref)}
        res["digits_vq"] = dr
    except Exception as e:  # noqa: BLE001
        res["digits_vq"] = {"error": repr(e)}
    return res


def timing(vq16: VQModel, vq32: VQModel, batches, variants: dict, iters: int, budget: float, prev=None,
           baselines=("eager_nchw", "cl_graph")) -> dict:
    res = {}
    toks = {b: torch.randint(0, vq16.config.n_embed, (b, 256), device="cuda") for b in batches}

    def run(name, make, bench_flag):
        torch.backends.cudnn.benchmark = bench_flag
        rec = {}
        try:
            dec = make()
            if hasattr(dec, "fuse_out"):
                rec["fuse_out"] = dec.fuse_out
            for b in batches:
                if time.perf_counter() - T0 > budget:
                    rec[b] = "skipped (budget)"
                    continue
                torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.no_grad():
                    dec(toks[b])
                torch.cuda.synchronize()
                first = (time.perf_counter() - t) * 1000
                with torch.no_grad():
                    rec[b] = time_fn(lambda: dec(toks[b]), iters if b < 64 else max(5, iters // 3))
                rec[b]["first_call_ms"] = first
                log(name, b, rec[b])
            dec = None  # frees the graphs before the next variant
        except Exception:  # noqa: BLE001
            rec["error"] = traceback.format_exc()
            log(name, "ERROR", rec["error"])
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        res[name] = rec

    if "eager_nchw" in baselines:
        run("eager_nchw", lambda: vq16.decode_checked, True)
    if "cl_graph" in baselines:
        run("cl_graph", lambda: ClGraph(vq16), False)
    if prev is not None:  # an earlier FastVQDecoder, timed in the same process for a like-for-like comparison
        run("prev", lambda: prev.FastVQDecoder(vq32, torch.bfloat16), False)
    for name, kw in variants.items():
        run(name, lambda kw=kw: FastVQDecoder(vq32, torch.bfloat16, **kw), False)
    run("fast_again", lambda: FastVQDecoder(vq32, torch.bfloat16), False)  # run-to-run spread of the default
    torch.backends.cudnn.benchmark = False
    return res


def batch_invariance(vq32: VQModel, prev=None, batch: int = 16, rows=(0, 7, 15)) -> dict:
    """An image decoded alone vs its row of a batch of `batch` (official shape, bf16, graphs): bit identity and
    max |diff| per decoder; for the fast decoder also eagerly op by op, naming the first op whose output for the
    image alone differs from its batch row (cuDNN / cuBLAS choose kernels per batch size)."""
    res = {}
    tok = torch.randint(0, vq32.config.n_embed, (batch, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(6))
    decs = {"fast": lambda: FastVQDecoder(vq32, torch.bfloat16)}
    if prev is not None:
        decs["prev"] = lambda: prev.FastVQDecoder(vq32, torch.bfloat16)
    for name, make in decs.items():
        try:
            dec = make()
            with torch.no_grad():
                full = dec(tok)
                rec = {}
                for i in rows:
                    alone = dec(tok[i:i + 1])
                    rec[f"row{i}"] = {"equal": bool(torch.equal(alone, full[i:i + 1])), "max_abs_diff": _diff(alone, full[i:i + 1])}
            rec["all_equal"] = all(v["equal"] for v in rec.values())
            res[name] = rec
            log("batch invariance", name, rec)
            dec = None
        except Exception:  # noqa: BLE001
            res[name] = {"error": traceback.format_exc()}
            log("batch invariance", name, "ERROR", res[name]["error"])
    try:
        res["fast_eager_ops"] = first_divergence(vq32, tok[:4], 1)
        log("batch invariance: first diverging op", res["fast_eager_ops"])
    except Exception:  # noqa: BLE001
        res["fast_eager_ops"] = {"error": traceback.format_exc()}
    torch.cuda.empty_cache()
    return res


def first_divergence(vq32: VQModel, tok: torch.Tensor, row: int) -> dict:
    """Eager decode (cudnn.benchmark on, as in the graphs' warm-up) of `tok` and of tok[row] alone, every conv,
    linear, attention and kernel op's output recorded; the ops whose outputs for that image differ."""
    import torch.nn.functional as F

    import aim_rt.vq_fast as vf

    def record(n_tok):
        dec = FastVQDecoder(vq32, torch.bfloat16, use_graphs=False)
        outs = []
        wrap = lambda name, fn: (lambda *a, **k: (lambda r: (outs.append((name, r)), r)[1])(fn(*a, **k)))  # noqa: E731
        dec._conv = wrap("conv", dec._conv)
        for m in ("stats", "apply", "subpixel_stats", "conv_out"):
            setattr(dec.ops, m, wrap(m, getattr(dec.ops, m)))
        old_lin, old_sdpa = F.linear, F.scaled_dot_product_attention
        vf.F.linear, vf.F.scaled_dot_product_attention = wrap("linear", old_lin), wrap("sdpa", old_sdpa)
        try:
            with torch.no_grad():
                dec(n_tok)  # cuDNN benchmark and lazy inits
                outs.clear()
                dec(n_tok)
        finally:
            vf.F.linear, vf.F.scaled_dot_product_attention = old_lin, old_sdpa
        return outs

    def flat(r):
        if r is None:
            return []
        if isinstance(r, (tuple, list)):
            return [t for x in r for t in flat(x)]
        return [r]

    full, alone = record(tok), record(tok[row:row + 1])
    diverged = []
    for i, ((name, rf), (_, ra)) in enumerate(zip(full, alone)):
        for j, (tf, ta) in enumerate(zip(flat(rf), flat(ra))):
            if not torch.equal(tf[row:row + 1], ta):
                diverged.append({"op_index": i, "op": name, "output": j, "shape": list(ta.shape),
                                 "max_abs_diff": _diff(tf[row:row + 1], ta)})
    by_kind = {}
    for d in diverged:
        by_kind[d["op"]] = by_kind.get(d["op"], 0) + 1
    ops = {}
    for name, _ in full:
        ops[name] = ops.get(name, 0) + 1
    return {"ops": len(full), "ops_by_kind": ops, "diverged_by_kind": by_kind, "first": diverged[:6]}


def host_timed(vq32: VQModel, prev=None, batches=(1, 16), reps: int = 20) -> dict:
    """`aim-rt bench`'s VQ column: median of `reps` host-timed calls (synchronize, perf_counter, call, synchronize)
    of CudaBackend.decode's decoder on a bf16 VQ of the official shape, tokens already on the device."""
    res = {}
    vq16 = copy.deepcopy(vq32).bfloat16()
    decs = {"fast": lambda: FastVQDecoder(vq16, torch.bfloat16)}
    if prev is not None:
        decs["prev"] = lambda: prev.FastVQDecoder(vq16, torch.bfloat16)
    for name, make in decs.items():
        rec = {}
        try:
            dec = make()
            for b in batches:
                tok = torch.randint(0, vq32.config.n_embed, (b, 256), device="cuda")
                with torch.no_grad():
                    dec(tok), dec(tok)
                    ts = []
                    for _ in range(reps):
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        dec(tok)
                        torch.cuda.synchronize()
                        ts.append((time.perf_counter() - t) * 1000)
                ts.sort()
                rec[b] = {"median_ms": ts[len(ts) // 2], "min_ms": ts[0], "max_ms": ts[-1], "reps": reps}
            dec = None
        except Exception:  # noqa: BLE001
            rec["error"] = traceback.format_exc()
        res[name] = rec
        log("host timed", name, rec)
    torch.cuda.empty_cache()
    return res


def profiles(vq16: VQModel, vq32: VQModel, out: Path, batch: int = 16) -> dict:
    summary = profiles_one(vq16, vq32, out, batch, with_reference=False)
    summary.update(profiles_one(vq16, vq32, out, 1, with_reference=False))
    summary.update(graph_gaps(vq32, batch))
    return summary


def graph_gaps(vq32: VQModel, batch: int) -> dict:
    """Kernel time inside the replayed graph vs the replay's wall time: the idle gaps between kernels."""
    from torch.profiler import ProfilerActivity, profile

    tok = torch.randint(0, vq32.config.n_embed, (batch, 256), device="cuda")
    dec = FastVQDecoder(vq32, torch.bfloat16)
    reps = 5
    with torch.no_grad():
        dec(tok), dec(tok)
        torch.cuda.synchronize()
        wall = time_fn(lambda: dec(tok), 20)["median_ms"]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                dec(tok)
            torch.cuda.synchronize()
    avg = prof.key_averages()
    kern = sum(e.device_time_total for e in avg) / 1000 / reps
    n = sum(e.count for e in avg if e.device_time_total > 0) / reps
    top = sorted(((e.key, e.device_time_total / 1000 / reps, e.count / reps) for e in avg), key=lambda x: -x[1])[:14]
    rec = {"wall_median_ms": wall, "kernel_sum_ms": kern, "kernels_per_call": n, "gaps_ms": wall - kern,
           "top": [{"kernel": k[:120], "ms": ms, "count": c} for k, ms, c in top]}
    log("graph gaps", batch, json.dumps(rec)[:1500])
    return {f"graph_b{batch}": rec}


def profiles_one(vq16: VQModel, vq32: VQModel, out: Path, batch: int, with_reference: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile

    tok = torch.randint(0, vq16.config.n_embed, (batch, 256), device="cuda")
    vq_cl = copy.deepcopy(vq16).to(memory_format=torch.channels_last)
    fast = FastVQDecoder(vq32, torch.bfloat16, use_graphs=False)
    summary = {}
    cases = [("eager_channels_last_bf16", lambda: vq_cl.decode_checked(tok)),
             ("eager_nchw_bf16", lambda: vq16.decode_checked(tok))] if with_reference else []
    for name, fn in cases + [("fast_eager_bf16", lambda: fast(tok))]:
        torch.backends.cudnn.benchmark = True
        with torch.no_grad():
            fn(), fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
        (out / f"profile_{name}_b{batch}.txt").write_text(table)
        tot = sum(e.device_time_total for e in prof.key_averages()) / 1000
        top = sorted(((e.key, e.device_time_total / 1000, e.count) for e in prof.key_averages()),
                     key=lambda x: -x[1])[:12]
        summary[f"{name}_b{batch}"] = {"kernel_ms_total": tot, "top": [{"kernel": k[:120], "ms": ms, "count": c} for k, ms, c in top]}
        log("profile", name, f"{tot:.2f} ms")
    torch.backends.cudnn.benchmark = False
    return summary


def cold_child(args) -> None:
    no_tf32()
    vq = official_vq()
    tok = torch.randint(0, vq.config.n_embed, (16, 256), device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    dec = FastVQDecoder(vq, torch.bfloat16, benchmark=not args.no_benchmark)
    torch.cuda.synchronize()
    t_init = time.perf_counter() - t
    dec(tok)
    torch.cuda.synchronize()
    t_first = time.perf_counter() - t
    t2 = time.perf_counter()
    dec(tok)
    torch.cuda.synchronize()
    print(json.dumps({"construct_s": t_init, "first_decode_s_incl_construct": t_first,
                      "second_call_ms": (time.perf_counter() - t2) * 1000,
                      "process_s_to_first_image": time.perf_counter() - T0}))


def cold_start() -> dict:
    res = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, AIM_RT_CACHE=cache, PYTHONPATH=str(ROOT))
        for i, extra in enumerate(([], [], ["--no-benchmark"])):
            name = ["first_process", "second_process", "third_process_no_cudnn_benchmark"][i]
            p = subprocess.run([sys.executable, __file__, "--cold-child", *extra], env=env, capture_output=True,
                               text=True, timeout=60)
            try:
                res[name] = json.loads(p.stdout.strip().splitlines()[-1])
            except Exception:  # noqa: BLE001
                res[name] = {"error": p.stdout[-2000:] + p.stderr[-3000:]}
            log("cold", name, res[name])
        res["cache_files"] = sorted(os.listdir(Path(cache) / "kernels")) if (Path(cache) / "kernels").is_dir() else []
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--budget", type=float, default=220.0, help="skip remaining timings after this many seconds")
    ap.add_argument("--cold-child", action="store_true")
    ap.add_argument("--no-benchmark", action="store_true")
    ap.add_argument("--prev-module", default="", help="module with an earlier FastVQDecoder to time alongside, "
                    "e.g. a copy of an older aim_rt/vq_fast.py placed as aim_rt._vq_fast_prev")
    ap.add_argument("--variants", default="", help="comma list of the fast variants to time besides `fast` "
                    "(default: all)")
    ap.add_argument("--baselines", default="eager_nchw,cl_graph", help="reference paths to time (comma list)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: kernels,accuracy,timing,profile,"
                    "cold,batch_invariance,host_timed")
    args = ap.parse_args()
    if args.cold_child:
        return cold_child(args)
    no_tf32()
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    batches = [int(b) for b in args.batches.split(",")]
    props = torch.cuda.get_device_properties(0)
    result = {"device": props.name, "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn": torch.backends.cudnn.version(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "vq_config": "VQConfig() (official shape), random weights seed 0", "tf32": False,
              "commit": (ROOT / "COMMIT").read_text().strip() if (ROOT / "COMMIT").is_file() else None}
    path = args.out / "vq_bench.json"

    def save():
        path.write_text(json.dumps(result, indent=1))

    variants = {"fast": dict(), "fast_chunk64k": dict(chunk_bytes=64 << 10),
                "fast_chunk16k_max512": dict(chunk_bytes=16 << 10, max_chunks=512),
                "fast_max128": dict(max_chunks=128), "fast_nofuse_out": dict(fuse_out=False),
                "fast_upsample": dict(subpixel=False), "fast_nobench": dict(benchmark=False)}
    variants = {k: v for k, v in variants.items() if k == "fast" or not args.variants or k in args.variants.split(",")}
    prev = None
    if args.prev_module:
        import importlib

        prev = importlib.import_module(args.prev_module)
    sections = [("kernels", lambda: kernel_checks(prev))]
    log("building the official-shape VQ")
    vq32 = official_vq()
    vq16 = copy.deepcopy(vq32).bfloat16()
    acc_variants = {k: variants[k] for k in ("fast", "fast_upsample", "fast_nofuse_out", "fast_chunk64k")
                    if k in variants}
    baselines = tuple(filter(None, args.baselines.split(",")))
    sections += [("accuracy", lambda: accuracy(vq32, vq16, acc_variants, prev)),
                 ("cold", lambda: cold_start()),
                 ("timing", lambda: timing(vq16, vq32, batches, variants, args.iters, args.budget, prev, baselines)),
                 ("batch_invariance", lambda: batch_invariance(vq32, prev)),
                 ("host_timed", lambda: host_timed(vq32, prev)),
                 ("profile", lambda: profiles(vq16, vq32, args.out))]
    for name, fn in sections:
        if name in skip:
            continue
        log("section", name)
        try:
            result[name] = fn()
        except Exception:  # noqa: BLE001
            result[name] = {"error": traceback.format_exc()}
            log(name, "ERROR", result[name]["error"])
        save()
        log(json.dumps(result[name])[:3000])
    result["wall_s"] = time.perf_counter() - T0
    save()
    log("done", path)


if __name__ == "__main__":
    main()
