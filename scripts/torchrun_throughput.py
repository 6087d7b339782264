"""1 GPU against N GPUs under torchrun, same arguments, on a random AiM-B checkpoint written first.

    PYTHONPATH=. python scripts/torchrun_throughput.py --out $OUT --gpus 2
Wall-clock time of the whole command (model load, graph capture, sampling, VQ, writing PNGs and the npz).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import aim_rt
from aim_rt.config import VQConfig
from aim_rt.loading import save_model
from aim_rt.vq import VQModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    work = Path("/tmp/aim_tr")
    ckpt = work / "aim-b-random"
    model = aim_rt.random_model("AiM-B", seed=0)
    torch.manual_seed(0)
    model.vq = VQModel(VQConfig()).eval()
    save_model(model, ckpt)
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", "."))
    common = ["-m", "aim_rt", "generate", str(ckpt), "-c", "random", "--num-images", str(args.images),
              "-b", str(args.batch), "--backend", "cuda", "--dtype", "bfloat16", "--no-grid"]
    report = {"device": torch.cuda.get_device_name(), "gpus_visible": torch.cuda.device_count(),
              "date": time.strftime("%Y-%m-%d"), "images": args.images, "batch": args.batch, "runs": {}}
    for n in (1, args.gpus):
        cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"] if n > 1 else [])
        t0 = time.time()
        res = subprocess.run(cmd + common + ["-o", str(work / f"out{n}")], env=env, capture_output=True, text=True)
        wall = time.time() - t0
        report["runs"][f"{n} GPU"] = {"wall_s": wall, "images_per_s": args.images / wall, "rc": res.returncode,
                                      "tail": res.stderr[-600:]}
        print(n, wall, res.returncode, res.stderr[-300:], flush=True)
    a, b = (np.load(work / f"out{n}" / "tokens.npz")["tokens"] for n in (1, args.gpus))
    report["tokens_identical"] = bool(np.array_equal(a, b))
    r = report["runs"]
    report["speedup"] = r["1 GPU"]["wall_s"] / r[f"{args.gpus} GPU"]["wall_s"]
    (args.out / "torchrun.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}), flush=True)


if __name__ == "__main__":
    main()
