"""Probe: what would a persistent decode step cost per layer? (scripts/persistent_probe.cu)

Random bf16 weights at AiM-B / AiM-L shapes. The probe kernel runs every layer of the backbone in one launch (one
256-thread block per SM, phases handed over by counters, next layer's weights streamed into shared memory under
the hand-overs). First its outputs are checked against the same arithmetic in torch (float32 on the GPU, TF32
off); then it is timed in a CUDA graph (also without arithmetic, and with the hand-overs alone: no data moved),
its phases stamped with clock64 per block, and, in the same process, `aim-rt bench --kernels`' numbers for the
cuda backend's step (its layers = the step less final norm, lm_head and sampler). Prints lines, writes JSON.
Needs a Hopper GPU (bulk copies).

Usage: python scripts/persistent_probe.py [--models AiM-B,AiM-L] [--batches 1,4] [--out FILE] [--no-backend]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("persistent_probe.cu")
KERNELS = Path(__file__).resolve().parents[1] / "plugins" / "aim_kernels.cu"
SHAPES = {"AiM-B": (768, 24), "AiM-L": (1024, 48)}  # d_model, layers (d_state 128, headdim 64, d_conv 4)
MAXR, MAXT, THREADS = 8, 5, 256


class ProbeParams(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in (
        "w_in", "w_out", "conv_w", "conv_b", "dt_bias", "A_log", "Dh", "norm_w", "gnorm_w", "mods", "conv_state",
        "ssm", "input", "residual", "zxbcdt", "y", "sumsq", "out", "ctr", "stamps")] + [
        ("L", ctypes.c_int), ("R", ctypes.c_int), ("cin_max", ctypes.c_int), ("cout_max", ctypes.c_int),
        ("sync_only", ctypes.c_int), ("eps", ctypes.c_float)]
STAMPS = ["A wait", "A norm", "A in_proj", "B wait", "B state update", "C wait", "C out_proj", "to next layer"]


def make_tensors(d: int, L: int, R: int, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    di, dev = 2 * d, "cuda"
    H, conv = di // 64, di + 256
    nin = 2 * di + 256 + H

    def rn(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape, generator=g, device=dev) * std + mean).to(torch.bfloat16)

    dt = torch.rand(L, H, generator=g, device=dev) * 0.099 + 0.001
    t = dict(
        w_in=rn(L, nin, d, std=d ** -0.5), w_out=rn(L, d, di, std=di ** -0.5), conv_w=rn(L, conv, 4, std=0.5),
        conv_b=rn(L, conv, std=0.1), dt_bias=(dt + torch.log(-torch.expm1(-dt))).to(torch.bfloat16),
        A_log=torch.log(torch.rand(L, H, generator=g, device=dev) * 15 + 1).to(torch.bfloat16),
        Dh=rn(L, H, mean=1.0, std=0.1), norm_w=rn(L, d, mean=1.0, std=0.1), gnorm_w=rn(L, di, mean=1.0, std=0.1),
        mods=rn(L, R, 3, d, std=0.1), conv_state=rn(L, R, conv, 4), ssm=rn(L, R, H, 64, 128, std=0.3),
        input=rn(R, d),
        residual=torch.zeros(2, R, d, device=dev), zxbcdt=torch.zeros(R, nin, device=dev, dtype=torch.bfloat16),
        y=torch.zeros(R, di, device=dev, dtype=torch.bfloat16), sumsq=torch.zeros(R, 4 * H, device=dev),
        out=torch.zeros(R, d, device=dev, dtype=torch.bfloat16), ctr=torch.zeros(3 * L + 1, device=dev, dtype=torch.int32))
    return t


def reference(t: dict, d: int, L: int, R: int, eps: float = 1e-5) -> dict:
    """The probe's arithmetic in torch: float32 math, rounded to bf16 where the kernel stores bf16."""
    f = lambda x: x.float()  # noqa: E731
    b = lambda x: x.to(torch.bfloat16).float()  # noqa: E731
    di, H = 2 * d, 2 * d // 64
    conv_state, ssm = t["conv_state"].clone(), t["ssm"].clone()
    out = f(t["input"])
    res = None
    sumsq = None
    for l in range(L):
        mods = f(t["mods"][l])
        if l == 0:
            res = out.clone()
        else:
            scale = torch.rsqrt(sumsq.sum(1, keepdim=True) / di + eps)
            res = res + b(out * scale * f(t["mods"][l - 1][:, 2]))
        inv = torch.rsqrt((res * res).mean(1, keepdim=True) + eps)
        xn = b(b(res * inv * f(t["norm_w"][l])) * (1 + mods[:, 1]) + mods[:, 0])
        zx = b(xn @ f(t["w_in"][l]).T)
        z, xbc, dtr = zx[:, :di], zx[:, di:di + di + 256], zx[:, 2 * di + 256:]
        win = torch.cat([f(conv_state[l][:, :, 1:]), xbc[:, :, None]], 2)  # (R, conv, 4)
        conv_state[l] = win.to(torch.bfloat16)
        xc = torch.nn.functional.silu((win * f(t["conv_w"][l])).sum(2) + f(t["conv_b"][l]))
        x, B, C = xc[:, :di].view(R, H, 64), xc[:, di:di + 128], xc[:, di + 128:]
        dt = torch.nn.functional.softplus(dtr + f(t["dt_bias"][l]))
        dA = torch.exp(-dt * torch.exp(f(t["A_log"][l])))
        h = f(ssm[l]) * dA[:, :, None, None] + (dt[:, :, None] * x)[..., None] * B[:, None, None, :]
        ssm[l] = h.to(torch.bfloat16)
        yv = (h * C[:, None, None, :]).sum(3) + f(t["Dh"][l])[None, :, None] * x
        gv = (yv * torch.nn.functional.silu(z.view(R, H, 64))).reshape(R, di)
        y = b(gv * f(t["gnorm_w"][l]))
        sumsq = (gv * gv).view(R, 4 * H, 16).sum(2)
        out = b(y @ f(t["w_out"][l]).T)
    return {"out": out, "residual": res, "ssm": f(ssm), "conv_state": f(conv_state), "zxbcdt": zx, "y": y}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="AiM-B,AiM-L")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--no-backend", action="store_true", help="skip timing the cuda backend's step")
    args = ap.parse_args()
    from cuda.bindings import driver

    from aim_rt.plugins.kernels import _check, compile_cubin, kernel_arch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.empty(1, device="cuda")
    major, minor = torch.cuda.get_device_capability()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    clock_ghz = _check(driver.cuDeviceGetAttribute(
        driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_CLOCK_RATE, torch.cuda.current_device()), "clock") / 1e6
    with tempfile.TemporaryDirectory() as tmp:  # the probe after aim_kernels.cu's helpers (no entry points)
        joined = Path(tmp) / "persistent_probe_joined.cu"
        joined.write_text(KERNELS.read_text() + "\n" + SOURCE.read_text())
        cubin = compile_cubin("bfloat16", kernel_arch(major, minor), use_cache=False, defines={"AIM_PARTS": 0},
                              source_path=joined)
    mod = _check(driver.cuModuleLoadData(cubin), "load")
    coop = driver.CUlaunchAttribute()
    coop.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_COOPERATIVE
    coop.value.cooperative = 1
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "sms": sms, "rows": []}
    models = args.models.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    for name in models:
        d, L = SHAPES[name]
        fn = _check(driver.cuModuleGetFunction(mod, f"probe_step_{d // 256}".encode()), "function")
        di, H = 2 * d, 2 * d // 64
        nin = 2 * di + 256 + H
        cin_max, cout_max = -(-nin // sms), -(-d // sms)
        smem = (cin_max * (d + 32) + cout_max * (di + 32) + MAXR * (di + 32)) * 2 + 8 * MAXT * 64 * 4 + 12288 + 16 + 8 * 4096
        _check(driver.cuFuncSetAttribute(
            fn, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem), "smem")
        for batch in batches:
            R = 2 * batch
            t = make_tensors(d, L, R)
            keep = {}
            p = ProbeParams(**{k: v.data_ptr() for k, v in t.items()}, stamps=None, L=L, R=R, cin_max=cin_max,
                            cout_max=cout_max, sync_only=0, eps=1e-5)

            def launch():
                holder = (ctypes.c_void_p * 1)(ctypes.addressof(p))
                cfg = driver.CUlaunchConfig()
                cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = sms, 1, 1
                cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = THREADS, 1, 1
                cfg.sharedMemBytes = smem
                cfg.hStream = driver.CUstream(torch.cuda.current_stream().cuda_stream)
                cfg.attrs = [coop]
                cfg.numAttrs = 1
                _check(driver.cuLaunchKernelEx(cfg, fn, ctypes.addressof(holder), 0), "launch")

            keep["conv"], keep["ssm"] = t["conv_state"].clone(), t["ssm"].clone()
            ref = reference(t, d, L, R)
            launch()
            torch.cuda.synchronize()
            got = {"out": t["out"], "residual": t["residual"][L & 1], "ssm": t["ssm"], "conv_state": t["conv_state"],
                   "zxbcdt": t["zxbcdt"], "y": t["y"]}
            errs = {k: rel(got[k], ref[k]) for k in ref}
            assert int(t["ctr"].abs().sum()) == 0, "counters not reset"
            # timing: a CUDA graph of 20 launches (the states evolve; every launch is a full step of the layers)
            def timed() -> float:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for _ in range(20):
                        launch()
                g.replay()
                torch.cuda.synchronize()
                times = []
                for _ in range(7):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record(); g.replay(); b.record(); b.synchronize()
                    times.append(a.elapsed_time(b) * 1e3 / 20)
                return sorted(times)[len(times) // 2]

            us = timed()
            p.sync_only = 1
            sync_us = timed()
            p.sync_only = 2
            bare_us = timed()
            p.sync_only = 0
            # where a layer's time goes: clock64 at the phases' edges, per block (layers 1 .. L-2)
            stamps = torch.zeros(L, sms, 8, dtype=torch.int64, device="cuda")
            p.stamps = stamps.data_ptr()
            launch()
            torch.cuda.synchronize()
            p.stamps = None
            st = stamps.double()
            nxt = torch.cat([st[1:, :, :1], st[-1:, :, :1]], 0)  # the next layer's phase A start
            edges = torch.cat([st, nxt], 2)
            parts = (edges[1:-1, :, 1:] - edges[1:-1, :, :-1]).mean((0, 1)) / clock_ghz / 1e3
            breakdown = {k: float(v) for k, v in zip(STAMPS, parts)}
            wbytes = L * (nin * d + d * di) * 2
            sbytes = 2 * L * R * (H * 64 * 128 + (di + 256) * 4) * 2
            row = {"model": name, "batch": batch, "rows": R, "layers": L, "probe_us": us, "us_per_layer": us / L,
                   "weight_MB": wbytes / 1e6, "state_MB": sbytes / 1e6,
                   "GBps": (wbytes + sbytes) / (us * 1e-6) / 1e9, "rel_err": errs, "sync_only_us": sync_us, "handovers_only_us": bare_us,
                   "breakdown_us_per_layer": breakdown}
            print(f"{name} b{batch}: probe {us:.1f} µs per step of {L} layers ({us / L:.2f} µs/layer), "
                  f"{row['GBps']:.0f} GB/s; no arithmetic {sync_us:.1f} µs ({sync_us / L:.2f}/layer), "
                  f"hand-overs alone {bare_us:.1f} µs ({bare_us / L:.2f}/layer); rel err "
                  + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)
            print("   per layer (µs, mean over blocks): " + ", ".join(f"{k} {v:.2f}" for k, v in breakdown.items()),
                  flush=True)
            result["rows"].append(row)
            del t
            torch.cuda.empty_cache()
    if not args.no_backend:
        from aim_rt.bench import kernel_table

        kt = kernel_table(models, batches)
        result["copy_bandwidth_TBps"] = kt["copy_bandwidth_TBps"]
        for krow in kt["rows"]:
            tail = sum(o["us_per_launch"] * o["launches_per_step"] for o in krow["ops"]
                       if o["op"] in ("final_norm", "lm_head", "sample"))
            name = krow["model"].split(" ")[0]
            for row in result["rows"]:
                if row["model"] == name and row["batch"] == krow["batch"]:
                    row["backend_step_us"] = krow["step_us_graph"]
                    row["backend_tail_us"] = tail
                    row["backend_layers_us"] = krow["step_us_graph"] - tail
                    row["speedup_layers"] = row["backend_layers_us"] / row["probe_us"]
                    print(f"{name} b{krow['batch']}: backend step {krow['step_us_graph']:.1f} µs (layers "
                          f"{row['backend_layers_us']:.1f}, tail {tail:.1f}); probe layers {row['probe_us']:.1f}: "
                          f"{row['speedup_layers']:.2f}x", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
