"""Backends behind one small interface: sample tokens for (class, seed) pairs, decode tokens to images.

Every backend takes the same per-image seeds and settings and must give the reference's tokens.
"""

from __future__ import annotations

from typing import Callable, Protocol

from torch import Tensor

from .config import AiMConfig
from .errors import AiMError
from .model import AiM
from .sampling import SamplingSettings, sample_tokens


class Backend(Protocol):
    name: str
    config: AiMConfig

    def sample(self, classes: Tensor, seeds: Tensor, settings: SamplingSettings, prefix: Tensor | None = None) -> Tensor:
        """(B,) classes, (B,) seeds → (B, num_tokens) int64 tokens on the CPU."""

    def decode(self, tokens: Tensor) -> Tensor:
        """(B, num_tokens) tokens → (B, 3, H, W) float images in [-1, 1]."""


class TorchBackend:
    """The reference: plain PyTorch on any device and dtype."""

    name = "torch"

    def __init__(self, model: AiM):
        self.model = model
        self.config = model.config

    def sample(self, classes, seeds, settings, prefix=None):
        return sample_tokens(self.model, classes, seeds, settings, prefix)

    def decode(self, tokens):
        return self.model.decode_tokens(tokens)


def _onnxruntime(model: AiM, engines: str | None = None, dtype: str = "float32") -> Backend:
    """Run the exported graphs; export them first (into `engines`, or a cache keyed by the weights) if needed."""
    import os
    from pathlib import Path

    from .ort_backend import OnnxRuntimeBackend

    sha = model.checkpoint.sha256() if model.checkpoint is not None else None
    if engines is None:
        cache = Path(os.environ.get("AIM_RT_CACHE", Path.home() / ".cache" / "aim-rt"))
        engines = cache / "exports" / f"{(sha or model.source.replace(':', '-'))[:16]}-{dtype}"
    engines = Path(engines)
    if not (engines / "manifest.json").exists():
        from aim_rt.exporters.onnx_export import export_onnx

        export_onnx(model, engines, dtype=dtype, model_sha256=sha)
    backend = OnnxRuntimeBackend(engines)
    if sha is not None and backend.manifest.get("model_sha256") not in (None, sha):
        raise AiMError(f"{engines} was exported from other weights (sha256 {backend.manifest['model_sha256'][:12]}…); "
                       f"pass another --engines directory or re-export with `aim-rt export`")
    return backend


def _torch(model: AiM, **_options) -> Backend:
    return TorchBackend(model)


def _tensorrt(model: AiM, engines: str | None = None, **_options) -> Backend:
    from pathlib import Path

    from aim_rt.engines.runner import TensorRTBackend

    if engines is None:
        raise AiMError("--backend tensorrt needs --engines DIR (made by `aim-rt export MODEL --format trt --out DIR`)")
    engines = Path(engines)
    return TensorRTBackend(engines / "engines" if (engines / "engines").is_dir() else engines, model)


def _cuda(model: AiM, **_options) -> Backend:
    import torch

    if not torch.cuda.is_available():
        raise AiMError("--backend cuda needs a CUDA GPU; this machine has none visible to torch (aim-rt doctor)")
    try:
        from .cuda_backend import CudaBackend

        return CudaBackend(model)
    except ImportError as e:
        raise AiMError(f"--backend cuda needs cuda-python with NVRTC: pip install 'aim-rt[cuda]' ({e})") from None


BACKENDS: dict[str, Callable[..., Backend]] = {"torch": _torch, "onnxruntime": _onnxruntime, "cuda": _cuda,
                                               "tensorrt": _tensorrt}


def make_backend(name: str, model: AiM, **options) -> Backend:
    """`options` (engines, dtype) matter to the backends that run exported artifacts; others ignore them."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise AiMError(f"unknown backend {name!r}; available here: {', '.join(BACKENDS)}") from None
    return factory(model, **options)


def available_backends() -> list[str]:
    return list(BACKENDS)
