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


BACKENDS: dict[str, Callable[[AiM], Backend]] = {"torch": TorchBackend}


def make_backend(name: str, model: AiM) -> Backend:
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise AiMError(f"unknown backend {name!r}; available here: {', '.join(BACKENDS)}") from None
    return factory(model)


def available_backends() -> list[str]:
    return list(BACKENDS)
