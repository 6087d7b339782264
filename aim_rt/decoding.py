"""The decode loop, written once: prefill → CFG mix → draw → feed the token back, over any `Decoder`.

A decoder is whatever computes the model's logits one position at a time (the reference model, the exported
graphs on ONNX Runtime, the TensorRT engines). The loop owns everything else: the request checks, the per-image
seeds, the settings, the position convention, teacher forcing and the record of mixed logits. `sample_tokens`
(sampling) and `sampler_logits` (teacher-forced CFG logits, the official sampler's numbers) are both this loop.

The cuda backend keeps its own device-resident loop (the whole point of it) but follows the same contract:
`check_request` for the arguments, `sampling.draw`'s randomness, and `decode`'s teacher / return_mixed rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from . import ops
from .config import AiMConfig
from .errors import SamplingError
from .model import AiM, DecodeState, Modulations
from .sampling import POSITION_CONVENTIONS, SamplingSettings, draw


class Decoder(Protocol):
    """The model, one position at a time. States go in and come out (an implementation may update in place).

    `mixed_with` is None when the logits are raw: (2B, V), the conditional rows then the null-class rows, which
    the loop mixes with `ops.cfg_mix`. Exported graphs apply that same mix inside the graph (the CfgMix node),
    so their decoders are made for one (cfg_scale, temperature), return (B, V) mixed logits and say which pair
    in `mixed_with`; the loop checks it against the settings.
    """

    config: AiMConfig
    mixed_with: tuple[float, float] | None

    def prefill(self, classes: Tensor, prefix: Tensor | None, position_offset: int) -> tuple[Tensor, Any]:
        """classes (B,) on the CPU, prefix (B, m) or None (token k at position k + position_offset)
        → logits predicting token m, and the state after the prefill."""

    def step(self, tokens: Tensor, position: int, state: Any) -> tuple[Tensor, Any]:
        """tokens (B,) on the CPU, fed to each image's conditional and null rows at `position`
        → logits predicting the next token, and the next state."""


# ----- the request: checked once, for every backend -------------------------------------------------
def check_request(config: AiMConfig, classes, seeds, prefix=None, teacher=None
                  ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Normalise and check a decode request; returns CPU int64 tensors (classes (B,), seeds (B,), prefix (B, m)
    or None when m = 0, teacher (B, n) or None).

    `teacher` (B, n), start < n <= num_tokens: the tokens to feed instead of the draws (teacher forcing); the
    loop then runs n positions.
    """
    num_classes, num_tokens, vocab = config.num_classes, config.num_tokens, config.vocab_size
    classes = torch.as_tensor(classes).long().reshape(-1).cpu()
    seeds = torch.as_tensor(seeds).long().reshape(-1).cpu()
    batch = classes.shape[0]
    if batch == 0:
        raise SamplingError("no classes given")
    if classes.shape != seeds.shape:
        raise SamplingError(f"need one seed per image: {classes.numel()} classes, {seeds.numel()} seeds")
    bad = classes[(classes < 0) | (classes >= num_classes)]
    if bad.numel():
        raise SamplingError(f"class {int(bad[0])} is out of range: this model has classes 0..{num_classes - 1}")
    if (seeds < 0).any():
        raise SamplingError("seeds must be >= 0")
    if prefix is not None:
        prefix = _check_tokens(prefix, "prefix", batch, vocab)
        if prefix.shape[1] >= num_tokens:
            raise SamplingError(
                f"prefix must be (B, m) with B = {batch} and m < {num_tokens}, got {tuple(prefix.shape)}")
        if prefix.shape[1] == 0:
            prefix = None
    if teacher is not None:
        teacher = _check_tokens(teacher, "teacher", batch, vocab)
        start = 0 if prefix is None else prefix.shape[1]
        if not start < teacher.shape[1] <= num_tokens:
            raise SamplingError(f"teacher tokens must have {start + 1}..{num_tokens} columns (the prefix has {start}), "
                                f"got {teacher.shape[1]}")
    return classes, seeds, prefix, teacher


def _check_tokens(tokens, what: str, batch: int, vocab: int) -> Tensor:
    tokens = torch.as_tensor(tokens).long().cpu()
    if tokens.dim() != 2 or tokens.shape[0] != batch:
        raise SamplingError(f"{what} must be (B, m) with B = {batch}, got {tuple(tokens.shape)}")
    if ((tokens < 0) | (tokens >= vocab)).any():
        raise SamplingError(f"{what} tokens must lie in [0, {vocab})")
    return tokens


# ----- the loop -----------------------------------------------------------------------------------
def mix(decoder: Decoder, logits: Tensor, settings: SamplingSettings) -> Tensor:
    """The decoder's logits → (B, V) float32 CFG-mixed, temperature-scaled logits."""
    if decoder.mixed_with is not None:
        return logits.float()
    batch = logits.shape[0] // 2
    return ops.cfg_mix(logits[:batch], logits[batch:], settings.cfg_scale, settings.temperature)


@torch.no_grad()
def decode(decoder: Decoder, classes, seeds, settings: SamplingSettings, prefix=None, teacher=None,
           return_mixed: bool = False):
    """Prefill, then draw each token from the mixed logits and feed it back: the official sampler.

    Returns the tokens (B, n) int64 on the CPU: the prefix, then the draws (n = num_tokens, or the teacher's
    length). With `teacher` (B, n) the teacher's tokens are fed back instead of the draws, and the returned
    tokens are still the draws. With `return_mixed`, also the mixed logits (B, n - m, V) float32 on the
    decoder's device, row j predicting token m + j (m = prefix length).
    """
    classes, seeds, prefix, teacher = check_request(decoder.config, classes, seeds, prefix, teacher)
    if decoder.mixed_with is not None and decoder.mixed_with != (settings.cfg_scale, settings.temperature):
        raise SamplingError(f"this decoder mixes with (cfg_scale, temperature) = {decoder.mixed_with}, the settings "
                            f"ask for {(settings.cfg_scale, settings.temperature)}")
    offset = settings.position_offset
    start = 0 if prefix is None else prefix.shape[1]
    length = decoder.config.num_tokens if teacher is None else teacher.shape[1]
    tokens = torch.empty(classes.shape[0], length, dtype=torch.long)
    if prefix is not None:
        tokens[:, :start] = prefix
    mixed_rows = []
    logits, state = decoder.prefill(classes, prefix, offset)
    for k in range(start, length):
        mixed = mix(decoder, logits, settings)
        if return_mixed:
            mixed_rows.append(mixed)
        drawn = draw(mixed, seeds, k, settings).cpu()
        tokens[:, k] = drawn
        if k + 1 == length:
            break
        fed = drawn if teacher is None else teacher[:, k].contiguous()
        logits, state = decoder.step(fed, k + offset, state)
    if return_mixed:
        return tokens, torch.stack(mixed_rows, dim=1)
    return tokens


# ----- the reference model as a decoder -------------------------------------------------------------
@dataclass
class ReferenceState:
    decode: DecodeState
    mods: Modulations  # depend only on the class: computed by the prefill, read by every step


class ReferenceDecoder:
    """AiM.prefill / step / embed_tokens on the model's device and dtype; raw (2B, V) logits."""

    mixed_with = None

    def __init__(self, model: AiM):
        self.model, self.config = model, model.config

    def prefill(self, classes: Tensor, prefix: Tensor | None, position_offset: int) -> tuple[Tensor, ReferenceState]:
        dev = self.model.device
        logits, state, mods = self.model.prefill(classes.to(dev), None if prefix is None else prefix.to(dev),
                                                 position_offset)
        return logits, ReferenceState(state, mods)

    def step(self, tokens: Tensor, position: int, state: ReferenceState) -> tuple[Tensor, ReferenceState]:
        rows = tokens.to(self.model.device).repeat(2)
        hidden = self.model.embed_tokens(rows, torch.full_like(rows, position))
        logits, state.decode = self.model.step(hidden, state.decode, state.mods)
        return logits, state


def sample_tokens(model: AiM, classes, seeds, settings: SamplingSettings, prefix=None) -> Tensor:
    """Sample (B, num_tokens) tokens with the reference model; optional prefix (B, m) of given first tokens."""
    return decode(ReferenceDecoder(model), classes, seeds, settings, prefix)


def sampler_logits(model: AiM, classes, tokens, cfg_scale: float, position_offset: int = 1) -> Tensor:
    """The official sampler, teacher-forced: CFG-mixed logits (B, N, V) float32, row k predicting tokens[:, k].

    Token k is fed at position k + position_offset (1 = official, 0 = the training convention); no temperature.
    """
    conventions = {offset: name for name, offset in POSITION_CONVENTIONS.items()}
    if position_offset not in conventions:
        raise SamplingError(f"position_offset must be one of {sorted(conventions)}, got {position_offset!r}")
    settings = SamplingSettings(cfg_scale=cfg_scale, top_k=0, top_p=1.0, temperature=1.0,
                                position_convention=conventions[position_offset])
    classes = torch.as_tensor(classes).long().reshape(-1)
    seeds = torch.zeros_like(classes)  # the draws are discarded: only the logits are wanted
    _, mixed = decode(ReferenceDecoder(model), classes, seeds, settings, teacher=tokens, return_mixed=True)
    return mixed
