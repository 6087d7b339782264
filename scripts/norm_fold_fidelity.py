"""How faithful the cuda backend's bf16 step is with and without in_proj norming its own x (NORM_FOLD_ROWS,
AIM_RT_NORM_FOLD), each against the same model in float32: teacher-forced on the separate norm's tokens, the
CFG-mixed logits of every step (max |diff| / max |ref|, mean |diff| / mean |ref|, argmax agreement) and the
draws' agreement. Random weights (a 4-layer d_model 256 model, "small", and presets); cfg 3, top-k 100, top-p
0.95. On Hopper, rows past aim_gemv's (batch 17 and up at AiM-B, 2 and up at AiM-XL) norm on aim_gemm (GEMM_NORM).

    PYTHONPATH=.:tests python scripts/norm_fold_fidelity.py [--models small,AiM-B] [--batches 1,4,16]
"""

import argparse
import os

import torch

import aim_rt
from aim_rt.cuda_backend import CudaBackend
from aim_rt.sampling import SamplingSettings
from conftest import rel_err

torch.backends.cuda.matmul.allow_tf32 = False


def stats(a, b):
    return (round(rel_err(a, b), 5), round(((a - b).abs().mean() / b.abs().mean()).item(), 5),
            round((a.argmax(-1) == b.argmax(-1)).float().mean().item(), 4))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="small,AiM-B")
    ap.add_argument("--batches", default="1,4,16")
    args = ap.parse_args()
    small = aim_rt.AiMConfig(d_model=256, n_layer=4, vocab_size=1024, num_classes=10, num_tokens=64)
    for name in args.models.split(","):
        cfg = small if name == "small" else aim_rt.preset(name)
        model = aim_rt.random_model(cfg, seed=5, device="cuda", dtype="bfloat16")
        f32 = CudaBackend(aim_rt.random_model(cfg, seed=5, device="cuda", dtype="float32"))
        settings = SamplingSettings(cfg_scale=3.0, top_k=100, top_p=0.95)
        os.environ["AIM_RT_NORM_FOLD"] = "0"
        plain = CudaBackend(model)
        os.environ["AIM_RT_NORM_FOLD"] = "32"
        normed = CudaBackend(model)
        for batch in map(int, args.batches.split(",")):
            classes, seeds = [c % cfg.num_classes for c in range(batch)], list(range(20, 20 + batch))
            tokens = plain.sample(classes, seeds, settings)
            dp, mp = plain.sample(classes, seeds, settings, teacher=tokens, return_mixed=True)
            dn, mn = normed.sample(classes, seeds, settings, teacher=tokens, return_mixed=True)
            df, mf = f32.sample(classes, seeds, settings, teacher=tokens, return_mixed=True)
            agree = lambda a, b: (a == b).float().mean().item()  # noqa: E731
            print(cfg.d_model, batch, "normed-vs-plain", stats(mn, mp), agree(dn, dp), "| plain-vs-f32", stats(mp, mf),
                  agree(dp, df), "| normed-vs-f32", stats(mn, mf), agree(dn, df), flush=True)


if __name__ == "__main__":
    main()
