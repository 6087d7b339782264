"""Sampling settings, per-image randomness and the draw: what turns mixed logits into a token.

The official rules kept: top-k (ties at the k-th value kept), then top-p, then a categorical draw. Deviations
(docs/SEMANTICS.md): the draw uses one uniform per (image seed, token index) from a counter-based hash and the
inverse CDF instead of torch.multinomial over the batch, so an image's tokens depend only on its class, seed
and settings, never on the batch it ran in, and a fast backend can draw the same numbers on the device.
The loop that calls `draw` is aim_rt.decoding.decode.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .errors import SamplingError

POSITION_CONVENTIONS = {"official": 1, "training": 0}
_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


MAX_CFG_SCALE = 1e3
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3


def _is_number(x) -> bool:
    """A finite real (not bool, not NaN, not inf)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class SamplingSettings:
    """Defaults are the official README call: cfg 5, top-k 600, top-p 0.98 (temperature 1 = not applied)."""

    cfg_scale: float = 5.0
    top_k: int = 600
    top_p: float = 0.98
    temperature: float = 1.0
    position_convention: str = "official"

    def __post_init__(self) -> None:
        # Bounds keep float32 sampling meaningful: (c - u) * cfg_scale / temperature must stay far from overflow
        # (logits are O(10)), else every row becomes inf/NaN and the draw silently returns one token.
        if not (_is_number(self.cfg_scale) and 0 <= self.cfg_scale <= MAX_CFG_SCALE):
            raise SamplingError(f"cfg_scale (--cfg-scale) must be a finite number in [0, {MAX_CFG_SCALE:g}], "
                                f"got {self.cfg_scale!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise SamplingError(f"top_k (--top-k) must be an integer >= 0 (0 = no top-k), got {self.top_k!r}")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise SamplingError(f"top_p (--top-p) must lie in (0, 1] (1 = no top-p), got {self.top_p!r}")
        if not (_is_number(self.temperature) and MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise SamplingError(f"temperature (--temperature) must be a finite number in [{MIN_TEMPERATURE:g}, "
                                f"{MAX_TEMPERATURE:g}], got {self.temperature!r}")
        if self.position_convention not in POSITION_CONVENTIONS:
            raise SamplingError(
                f"position_convention must be one of {sorted(POSITION_CONVENTIONS)}, got {self.position_convention!r}")

    @property
    def position_offset(self) -> int:
        return POSITION_CONVENTIONS[self.position_convention]

    def to_dict(self) -> dict:
        return asdict(self)


# ----- randomness ---------------------------------------------------------------------------------
def _hash32(x: Tensor) -> Tensor:
    """'lowbias32' integer hash on int64 tensors holding uint32 values (products wrap; low bits are exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniforms(seeds: Tensor, step: int) -> Tensor:
    """One uniform in [0, 1) per row from (64-bit image seed, token index): 24 bits, exact in float32."""
    seeds = seeds.long()
    hi = _hash32((seeds >> 32) & _MASK32)
    key = _hash32((seeds & _MASK32) ^ hi)
    step_key = _hash32(torch.full_like(key, (step ^ 0x9E3779B9) & _MASK32))
    r = _hash32((key + step_key) & _MASK32)
    return (r >> 8).float() * (1.0 / (1 << 24))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def image_seed(base_seed: int, cls: int, index: int) -> int:
    """The seed of image `index` of class `cls` in a run with `base_seed`: independent of everything else."""
    if not isinstance(base_seed, int) or base_seed < 0:
        raise SamplingError(f"seed must be an integer >= 0, got {base_seed!r}")
    mixed = _splitmix64(_splitmix64(base_seed & _MASK64) ^ ((cls & _MASK32) << 32 | (index & _MASK32)))
    return mixed >> 1  # keep it in int64 range


# ----- the draw -----------------------------------------------------------------------------------
def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Official `sample()` filtering: keep logits >= the k-th largest, then the top-p nucleus (top token kept)."""
    logits = logits.float()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
        remove[..., -1] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def categorical(logits: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw in vocabulary order: the first token whose cumulative probability exceeds u."""
    cdf = torch.softmax(logits.float(), dim=-1).cumsum(-1)
    target = (u.to(cdf.device) * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


def draw(mixed: Tensor, seeds: Tensor, step: int, settings: SamplingSettings) -> Tensor:
    """Token `step` of each image from its CFG-mixed, temperature-scaled logits."""
    return categorical(filter_logits(mixed, settings.top_k, settings.top_p), uniforms(seeds, step))
