"""Everything the GPU must show, in one run: the GPU tests, the parity numbers, a profile and the benchmark.

    PYTHONPATH=. python scripts/gpu_check.py --out results/      # on the H200 (the device tool)

Writes pytest_gpu.txt, parity.json, profile.txt and bench.json under --out. TF32 is off throughout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import aim_rt
from aim_rt.bench import format_kernel_table, kernel_table, run_bench
from aim_rt.config import VQConfig
from aim_rt.cuda_backend import CudaBackend
from aim_rt.decoding import sample_tokens, sampler_logits
from aim_rt.sampling import SamplingSettings, draw
from aim_rt.vq import VQModel

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def parity(report: dict) -> None:
    settings = SamplingSettings()  # official: cfg 5, top-k 600, top-p 0.98
    classes, seeds = torch.arange(8) * 125, torch.arange(8)
    ref32 = aim_rt.random_model("AiM-B", seed=0, device="cuda")
    tokens = sample_tokens(ref32, classes, seeds, settings)
    ref_logits = sampler_logits(ref32, classes, tokens, settings.cfg_scale)
    for dtype in ("float32", "bfloat16"):
        model = ref32 if dtype == "float32" else aim_rt.random_model("AiM-B", seed=0, device="cuda", dtype=dtype)
        backend = CudaBackend(model)
        drawn, mixed = backend.sample(classes, seeds, settings, teacher=tokens, return_mixed=True)
        ref_draws = torch.stack([draw(ref_logits[:, k].cpu(), seeds, k, settings) for k in range(256)], dim=1)
        ours = backend.sample(classes, seeds, settings)
        same_dtype_ref = tokens if dtype == "float32" else sample_tokens(model, classes, seeds, settings)
        same = ours == same_dtype_ref
        first_diff = [int((~row).nonzero()[0]) if (~row).any() else 256 for row in same]
        report[f"AiM-B {dtype}"] = {
            "teacher_forced_logits_rel_err_vs_fp32_reference_256_steps": rel(mixed, ref_logits),
            "teacher_forced_draw_agreement_vs_fp32_reference": (drawn == ref_draws).float().mean().item(),
            "free_running_identical_images_vs_reference_same_dtype": same.all(1).float().mean().item(),
            "free_running_first_divergence_per_image": first_diff,
            "images": 8,
        }
        print(dtype, report[f"AiM-B {dtype}"], flush=True)
    torch.manual_seed(0)
    vq32 = VQModel(VQConfig()).cuda().eval()
    vq16 = VQModel(VQConfig()).cuda().eval()
    vq16.load_state_dict(vq32.state_dict())
    vq16.to(torch.bfloat16)
    model16 = aim_rt.random_model("AiM-B", seed=0, device="cuda", dtype="bfloat16")
    model16.vq = vq16
    images = CudaBackend(model16).decode(tokens)
    report["VQ-f16 bf16 graph vs fp32 reference, 8 images"] = {"rel_err": rel(images, vq32.decode_tokens(tokens))}


def profile(path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile as prof

    model = aim_rt.random_model("AiM-B", seed=0, device="cuda", dtype="bfloat16")
    backend = CudaBackend(model, use_graphs=False)
    settings = SamplingSettings()
    backend.sample(torch.arange(16), torch.arange(16), settings)
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        backend.sample(torch.arange(16), torch.arange(16), settings)
    path.write_text("AiM-B bf16 batch 16, eager (no graph) so every kernel is listed; one full sample\n"
                    + p.key_averages().table(sort_by="cuda_time_total", row_limit=25))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--skip", default="", help="comma list of: tests, parity, profile, kernels, bench")
    ap.add_argument("--models", default="AiM-B,AiM-L,AiM-XL")
    ap.add_argument("--torch-models", default="AiM-B", help="models also timed with the torch reference")
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    t0 = time.time()
    if "tests" not in skip:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                            "tests/test_cuda_backend.py", "tests/test_kernel_layout.py", "tests/test_vq_fast.py",
                            "tests/test_digits_quality.py"],
                           capture_output=True, text=True)
        (args.out / "pytest_gpu.txt").write_text(r.stdout + r.stderr)
        print(r.stdout[-3000:], flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if "parity" not in skip:
        parity(report)
        (args.out / "parity.json").write_text(json.dumps(report, indent=1) + "\n")
    if "profile" not in skip:
        profile(args.out / "profile.txt")
    if "kernels" not in skip:
        table = kernel_table(args.models.split(","), [int(b) for b in args.batches.split(",")],
                             progress=lambda row: print(row["model"], row["batch"], f"{row['step_us_graph']:.1f} us",
                                                        flush=True))
        (args.out / "kernels.json").write_text(json.dumps(table, indent=1) + "\n")
        (args.out / "kernels.txt").write_text(format_kernel_table(table) + "\n")
        print(format_kernel_table(table), flush=True)
    if "bench" not in skip:
        # the reference (seconds per image) only where a ratio is wanted; the fast path on every model
        batches = [int(b) for b in args.batches.split(",")]
        show = lambda row: print(row, flush=True)  # noqa: E731
        torch_models = [m for m in args.torch_models.split(",") if m]
        result = run_bench(torch_models, batches, ["torch", "cuda"], progress=show)
        rest = [m for m in args.models.split(",") if m not in torch_models]
        if rest:
            result["rows"] += run_bench(rest, batches, ["cuda"], progress=show)["rows"]
        (args.out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
