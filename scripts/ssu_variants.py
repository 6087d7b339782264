"""Time compile-time variants of the selective-state-update kernel at the official shapes, one process.

    PYTHONPATH=. python scripts/ssu_variants.py --out results/ssu_variants.json

Each variant is the same source with other -D values (block size, minimum resident blocks). Each case runs
the kernel over every layer's own state (no L2-resident replay) as a CUDA graph; the bytes are those the op
must move (aim_rt.bench.op_bytes). Outputs of every variant are checked against the default variant.
"""

import argparse
import json
import time

import torch

import aim_rt
from aim_rt.bench import copy_bandwidth, op_bytes, replay_us
from aim_rt.plugins.kernels import Kernels, ssu_params

VARIANTS = {  # the first is the default build; outputs of the others are compared with it
    "t256_min4": {},
    "t128": {"SSU_THREADS": 128, "SSU_MIN_BLOCKS": 1},
    "t256": {"SSU_THREADS": 256, "SSU_MIN_BLOCKS": 1},
    "t512_min2": {"SSU_THREADS": 512, "SSU_MIN_BLOCKS": 2},
}
CASES = [("AiM-B", 1), ("AiM-B", 16), ("AiM-B", 64), ("AiM-XL", 1), ("AiM-XL", 16)]


def case_tensors(cfg, rows, g):
    dev, dt = "cuda", torch.bfloat16
    r = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g)).to(dev, dt)  # noqa: E731
    L = cfg.n_layer
    return dict(
        zxbcdt=r(rows, cfg.d_in_proj), conv=r(L, rows, cfg.conv_dim, cfg.d_conv),
        ssm=r(L, rows, cfg.nheads, cfg.headdim, cfg.d_state),
        weights=dict(conv_weight=r(cfg.conv_dim, 1, cfg.d_conv, scale=0.5), conv_bias=r(cfg.conv_dim, scale=0.1),
                     dt_bias=r(cfg.nheads, scale=0.5) - 3, A_log=r(cfg.nheads, scale=0.5) + 1, D=r(cfg.nheads),
                     norm_weight=1 + r(cfg.d_inner, scale=0.1)),
        y=torch.zeros(rows, cfg.d_inner, device=dev, dtype=dt), sumsq=torch.zeros(rows, cfg.nheads, device=dev))


def params(cfg, t, layer):
    z = t["zxbcdt"]
    d_in, d_x = cfg.d_inner, cfg.d_inner + cfg.conv_dim
    return ssu_params(xbc=z[:, d_in:d_x], z=z[:, :d_in], dt=z[:, d_x:], conv_state_in=t["conv"][layer],
                      conv_state_out=t["conv"][layer], ssm_state_in=t["ssm"][layer], ssm_state_out=t["ssm"][layer],
                      weights=t["weights"], sumsq=t["sumsq"], y=t["y"], headdim=cfg.headdim, d_state=cfg.d_state,
                      ngroups=cfg.ngroups, eps=cfg.norm_eps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    bandwidth = copy_bandwidth(torch.device("cuda"))
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
              "copy_bandwidth_TBps": bandwidth / 1e12, "variants": VARIANTS, "cases": []}
    kernels = {name: Kernels("bfloat16", defines=d) for name, d in VARIANTS.items()}
    for model, batch in CASES:
        cfg = aim_rt.preset(model)
        rows = 2 * batch
        nbytes = op_bytes(cfg, batch, 2)["selective_state_update"]
        row = {"model": model, "batch": batch, "bytes": nbytes}
        reference = None
        for name, k in kernels.items():
            t = case_tensors(cfg, rows, torch.Generator().manual_seed(0))
            stream = torch.cuda.current_stream().cuda_stream
            k.selective_state_update(params(cfg, t, 0), stream, finish=True)  # one full op: check the outputs
            out = [t["y"].clone(), t["conv"][0].clone(), t["ssm"][0].clone()]
            if reference is None:
                reference = out
            same = all(torch.equal(a, b) for a, b in zip(out, reference))
            ps = [params(cfg, t, i) for i in range(cfg.n_layer)]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(args.reps):
                    for p in ps:
                        k.selective_state_update(p, torch.cuda.current_stream().cuda_stream, finish=False)
            us = replay_us(graph, args.reps * cfg.n_layer)
            row[name] = {"us": us, "GBps": nbytes / us / 1e3, "of_copy": nbytes / (us * 1e-6) / bandwidth,
                         "outputs_equal_default": same}
            print(model, batch, name, f"{us:.2f} us", f"{nbytes / (us * 1e-6) / bandwidth:.0%}", same, flush=True)
        result["cases"].append(row)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
