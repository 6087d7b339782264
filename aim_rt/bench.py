"""`aim-rt bench`: latency and throughput of every available backend, against the memory-bandwidth floor.

A model is a checkpoint or a preset name (random weights at the official shapes, VQ-f16 with random weights).
Warm-up (compilation, graph capture) is excluded; each cell is the median of `repeats` timed runs, with CUDA
synchronisation around each region. The floor is the time to read the weights a step touches once and to
read + write every row's conv and SSM state once, at the copy bandwidth measured in the same process.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .config import AiMConfig, VQConfig, preset
from .loading import load_model, random_model, resolve_dtype
from .sampling import SamplingSettings
from .vq import VQModel


@dataclass
class BenchRow:
    model: str
    backend: str
    dtype: str
    batch: int
    ms_per_step: float
    autoregressive_ms: float
    vq_ms: float
    end_to_end_ms: float
    images_per_s: float
    peak_memory_gb: float
    floor_ms_per_step: float
    ratio_to_floor: float
    note: str = ""


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes moved per second (read + write) by a device-to-device copy."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / min(times)


def step_bytes(cfg: AiMConfig, batch: int, elem_bytes: int) -> int:
    """Weights one decode step must read (the adaLN is per sequence) + state read and written, 2B rows."""
    per_layer = (cfg.d_model * cfg.d_in_proj + cfg.conv_dim * (cfg.d_conv + 1) + cfg.d_inner * cfg.d_model
                 + cfg.d_model + cfg.d_inner + 3 * cfg.nheads)
    weights = cfg.n_layer * per_layer + cfg.vocab_size * cfg.d_model + 2 * cfg.d_model
    state_per_row = cfg.n_layer * (cfg.conv_dim * cfg.d_conv + cfg.nheads * cfg.headdim * cfg.d_state)
    return (weights + 2 * (2 * batch) * state_per_row) * elem_bytes


def _model(spec: str, device, dtype):
    try:
        cfg = preset(spec)
    except Exception:
        return load_model(spec, device=device, dtype=dtype), spec
    model = random_model(cfg, seed=0, device=device, dtype=dtype)
    torch.manual_seed(0)
    model.vq = VQModel(VQConfig()).to(device, resolve_dtype(dtype)).eval()
    return model, f"{spec} (random weights)"


def _timed(fn, device, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def make(backend: str, model):
    if backend == "torch":
        from .backends import TorchBackend

        return TorchBackend(model)
    if backend == "cuda":
        from .cuda_backend import CudaBackend

        return CudaBackend(model)
    if backend == "mamba-ssm":
        raise RuntimeError("mamba-ssm is not installed here" if not _has("mamba_ssm")
                           else "the mamba-ssm comparison backend is not written yet")
    raise ValueError(f"unknown backend {backend!r}")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run_bench(models: list[str], batches: list[int], backends: list[str], dtype: str = "bfloat16",
              repeats: int = 3, device: str = "cuda", progress=None) -> dict:
    dev = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    bandwidth = copy_bandwidth(dev)
    elem = torch.empty(0, dtype=resolve_dtype(dtype)).element_size()
    settings = SamplingSettings()  # the official README call: cfg 5, top-k 600, top-p 0.98
    rows: list[BenchRow] = []
    for spec in models:
        model, label = _model(spec, dev, dtype)
        cfg = model.config
        for name in backends:
            try:
                backend = make(name, model)
            except Exception as e:  # a backend this machine cannot run: say so in the table
                rows.append(BenchRow(label, name, dtype, 0, *[float("nan")] * 9, note=f"skipped: {e}"))
                continue
            for batch in batches:
                classes = torch.arange(batch) % cfg.num_classes
                seeds = torch.arange(batch)
                reps = repeats if name != "torch" else max(1, min(repeats, 2))
                backend.sample(classes, seeds, settings)  # warm-up: compile, capture
                tokens = backend.sample(classes, seeds, settings)
                backend.decode(tokens)
                torch.cuda.reset_peak_memory_stats(dev)
                ar, tokens = _timed(lambda: backend.sample(classes, seeds, settings), dev, reps)
                vq, _ = _timed(lambda: backend.decode(tokens), dev, reps)
                e2e, _ = _timed(lambda: backend.decode(backend.sample(classes, seeds, settings)), dev, reps)
                floor = step_bytes(cfg, batch, elem) / bandwidth
                per_step = ar / cfg.num_tokens
                row = BenchRow(label, name, dtype, batch, per_step * 1e3, ar * 1e3, vq * 1e3, e2e * 1e3,
                               batch / e2e, torch.cuda.max_memory_allocated(dev) / 2**30, floor * 1e3,
                               per_step / floor)
                rows.append(row)
                if progress:
                    progress(row)
        del model
        torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(dev),
        "copy_bandwidth_TBps": bandwidth / 1e12,
        "torch": torch.__version__,
        "settings": settings.to_dict(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": [asdict(r) for r in rows],
    }
