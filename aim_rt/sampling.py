"""The reference sampler: the official decode loop with per-image, counter-based randomness.

Official semantics kept: conditional rows then null-class rows, the class token prefilled, image token k fed
at position k + 1, logit-space CFG, top-k then top-p, a categorical draw, only conditional tokens fed back.
Deviations (documented in the README):
  * `temperature` divides the mixed logits before top-k/top-p (the official code ignores it; 1.0 = official);
  * the draw uses one uniform per (image seed, token index) from a counter-based hash and the inverse CDF,
    instead of torch.multinomial over the batch. An image's tokens therefore depend only on its class, seed
    and settings, never on the batch it ran in, and a fast backend can draw the same numbers on the device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import ops
from .errors import SamplingError

if TYPE_CHECKING:
    from .model import AiM

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


def next_tokens(cond: Tensor, uncond: Tensor, seeds: Tensor, step: int, settings: SamplingSettings) -> Tensor:
    return draw(ops.cfg_mix(cond, uncond, settings.cfg_scale, settings.temperature), seeds, step, settings)


def cfg_rows(classes: Tensor, null_class: int) -> Tensor:
    """The official doubled batch: conditional rows, then as many null-class rows."""
    return torch.cat([classes, torch.full_like(classes, null_class)])


# ----- argument checks shared by every backend ---------------------------------------------------
def check_request(num_classes: int, num_tokens: int, vocab_size: int, classes, seeds, prefix=None):
    classes = torch.as_tensor(classes).long().reshape(-1).cpu()
    seeds = torch.as_tensor(seeds).long().reshape(-1).cpu()
    if classes.numel() == 0:
        raise SamplingError("no classes given")
    if classes.shape != seeds.shape:
        raise SamplingError(f"need one seed per image: {classes.numel()} classes, {seeds.numel()} seeds")
    bad = classes[(classes < 0) | (classes >= num_classes)]
    if bad.numel():
        raise SamplingError(f"class {int(bad[0])} is out of range: this model has classes 0..{num_classes - 1}")
    if (seeds < 0).any():
        raise SamplingError("seeds must be >= 0")
    if prefix is not None:
        prefix = torch.as_tensor(prefix).long().cpu()
        if prefix.dim() != 2 or prefix.shape[0] != classes.shape[0] or prefix.shape[1] >= num_tokens:
            raise SamplingError(
                f"prefix must be (B, m) with B = {classes.shape[0]} and m < {num_tokens}, got {tuple(prefix.shape)}")
        if ((prefix < 0) | (prefix >= vocab_size)).any():
            raise SamplingError(f"prefix tokens must lie in [0, {vocab_size})")
        if prefix.shape[1] == 0:
            prefix = None
    return classes, seeds, prefix


@torch.no_grad()
def sample_tokens(model: "AiM", classes, seeds, settings: SamplingSettings, prefix=None) -> Tensor:
    """Sample (B, num_tokens) tokens with the reference model; optional prefix (B, m) of given first tokens."""
    cfg = model.config
    classes, seeds, prefix = check_request(cfg.num_classes, cfg.num_tokens, cfg.vocab_size, classes, seeds, prefix)
    device = model.device
    batch, offset = classes.shape[0], settings.position_offset
    start = 0 if prefix is None else prefix.shape[1]
    logits, state, mods = model.prefill(classes.to(device), None if prefix is None else prefix.to(device), offset)

    out = torch.empty(batch, cfg.num_tokens, dtype=torch.long)
    if prefix is not None:
        out[:, :start] = prefix
    for k in range(start, cfg.num_tokens):
        tok = next_tokens(logits[:batch], logits[batch:], seeds, k, settings)
        out[:, k] = tok.cpu()
        if k + 1 == cfg.num_tokens:
            break
        tok2 = tok.to(device).repeat(2)
        logits, state = model.step(model.embed_tokens(tok2, torch.full_like(tok2, k + offset)), state, mods)
    return out
