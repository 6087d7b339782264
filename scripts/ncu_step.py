"""A few eager decode steps of the cuda backend, for Nsight Compute (`ncu -k regex:aim_ ... python this.py`).

    ncu -k regex:aim_selective --launch-skip 48 --launch-count 2 --section SpeedOfLight \
        python scripts/ncu_step.py --model AiM-B --batch 16
"""

import argparse

import torch

import aim_rt
from aim_rt.cuda_backend import CudaBackend
from aim_rt.sampling import SamplingSettings

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="AiM-B")
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--no-fold", action="store_true", help="out_proj without the residual add folded in")
args = ap.parse_args()
model = aim_rt.random_model(args.model, seed=0, device="cuda", dtype="bfloat16")
backend = CudaBackend(model, use_graphs=False)
if args.no_fold:
    backend.kernels.fold_rows, backend.kernels.gemm_resids = 0, {}
settings = SamplingSettings()
buf = backend._alloc(args.batch)
buf.seeds.copy_(torch.arange(args.batch))
with torch.no_grad():
    backend._prefill(buf, torch.arange(args.batch), None, settings)
with torch.no_grad():
    for _ in range(args.steps):
        backend._step(buf, settings)
torch.cuda.synchronize()
print("done")
