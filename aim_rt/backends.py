"""Backends behind one small interface: sample tokens for (class, seed) pairs, decode tokens to images.

Every backend takes the same per-image seeds and settings and must give the reference's tokens. Options of
`make_backend`, the same for every backend (those that do not need one ignore it):
  artifacts     the directory `aim-rt export` wrote (ONNX graphs, TensorRT engines under engines/);
  model_sha256  the loaded weights' hash: exported artifacts of other (or unknown) weights are refused;
  dtype         the precision to export in when onnxruntime exports on the fly.
"""

from __future__ import annotations

from typing import Callable, Protocol

from torch import Tensor

from .config import AiMConfig
from .errors import AiMError
from . import decoding
from .model import AiM
from .sampling import SamplingSettings


class Backend(Protocol):
    name: str
    config: AiMConfig

    def sample(self, classes: Tensor, seeds: Tensor, settings: SamplingSettings, prefix: Tensor | None = None) -> Tensor:
        """(B,) classes, (B,) seeds → (B, num_tokens) int64 tokens on the CPU. Backends also take decoding.decode's
        `teacher` and `return_mixed` (parity checks)."""

    def decode(self, tokens: Tensor) -> Tensor:
        """(B, num_tokens) tokens → (B, 3, H, W) float images in [-1, 1]."""


class TorchBackend:
    """The reference: plain PyTorch on any device and dtype."""

    name = "torch"

    def __init__(self, model: AiM):
        self.model = model
        self.config = model.config

    def sample(self, classes, seeds, settings, prefix=None, teacher=None, return_mixed=False):
        return decoding.decode(decoding.ReferenceDecoder(self.model), classes, seeds, settings, prefix, teacher,
                               return_mixed)

    def decode(self, tokens):
        return self.model.decode_tokens(tokens)


def default_artifacts_dir(model_sha256: str | None, source: str, dtype: str):
    """Where onnxruntime exports on first use when no artifacts directory is given: keyed by the weights."""
    import os
    from pathlib import Path

    cache = Path(os.environ.get("AIM_RT_CACHE", Path.home() / ".cache" / "aim-rt"))
    return cache / "exports" / f"{(model_sha256 or source.replace(':', '-').replace('/', '-'))[:16]}-{dtype}"


def _onnxruntime(model: AiM, artifacts=None, model_sha256: str | None = None, dtype: str = "float32",
                 **_options) -> Backend:
    """Run the exported graphs; export them first (into `artifacts`, or a cache keyed by the weights) if needed.
    (`aim-rt generate` exports under the artifacts directory's lock first: generate.open_backend.)"""
    from pathlib import Path

    from .ort_backend import OnnxRuntimeBackend
    from .validation import check_artifacts_hash

    if artifacts is None:
        artifacts = default_artifacts_dir(model_sha256, getattr(model, "source", "model"), dtype)
    artifacts = Path(artifacts)
    if not (artifacts / "manifest.json").exists():
        from aim_rt.exporters.onnx_export import export_onnx

        export_onnx(model, artifacts, dtype=dtype, model_sha256=model_sha256)
    backend = OnnxRuntimeBackend(artifacts)
    check_artifacts_hash(backend.manifest, model_sha256, artifacts, getattr(model, "source", "MODEL"))
    return backend


def _torch(model: AiM, **_options) -> Backend:
    return TorchBackend(model)


def _tensorrt(model: AiM, artifacts=None, **_options) -> Backend:
    from pathlib import Path

    from aim_rt.engines.runner import TensorRTBackend

    if artifacts is None:
        raise AiMError("--backend tensorrt needs --artifacts DIR (made by `aim-rt export MODEL --format trt --out DIR`)")
    artifacts = Path(artifacts)
    return TensorRTBackend(artifacts / "engines" if (artifacts / "engines").is_dir() else artifacts, model)


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


def make_backend(name: str, model: AiM, *, artifacts=None, model_sha256: str | None = None,
                 dtype: str = "float32") -> Backend:
    """The backend `name` for `model`; the options are described in this module's docstring."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise AiMError(f"unknown backend {name!r}; available here: {', '.join(BACKENDS)}") from None
    return factory(model, artifacts=artifacts, model_sha256=model_sha256, dtype=dtype)


def available_backends() -> list[str]:
    return list(BACKENDS)
