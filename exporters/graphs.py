"""The graphs engines are built from, as torch modules over the reference model (traced by the exporter).

  prefill(classes[B], cfg_scale[], temperature[] (, prefix[B, m], position_offset[]))
      → logits[B, V] (CFG-mixed, / temperature), conv_state[L, 2B, C, W], ssm_state[L, 2B, H, P, N],
        mods[L, 2B, 3, d], final_mods[2B, 2, d]
      Rows are the classes then as many null-class rows; the class token (and the prefix, token k at position
      k + position_offset) runs through the chunked scan. The modulations depend only on the class: computed
      here once, fed to every step.
  step(tokens[B], position[], conv_state, ssm_state, mods, final_mods, cfg_scale[], temperature[])
      → logits[B, V], conv_state_out, ssm_state_out
      One token per image, fed to its conditional and its null row at `position`.
The prefix length m is fixed when a prefill graph is exported (0: the class token only); the batch is dynamic.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aim_rt import ops
from aim_rt.model import AiM, DecodeState, Modulations


class PrefillGraph(nn.Module):
    def __init__(self, model: AiM, prefix_len: int = 0, cfg_op=None):
        super().__init__()
        self.model, self.prefix_len = model, prefix_len
        self.cfg_op = cfg_op or _cfg_mix_portable

    def forward(self, classes: Tensor, cfg_scale: Tensor, temperature: Tensor, prefix: Tensor | None = None,
                position_offset: Tensor | None = None):
        logits, state, mods = self.model.prefill(classes, prefix if self.prefix_len else None, position_offset)
        return self.cfg_op(logits, cfg_scale, temperature), state.conv, state.ssm, mods.layers, mods.final


class StepGraph(nn.Module):
    def __init__(self, model: AiM, ssm_op=ops.selective_state_update, cfg_op=None):
        super().__init__()
        self.model, self.ssm_op = model, ssm_op
        self.cfg_op = cfg_op or _cfg_mix_portable

    def forward(self, tokens: Tensor, position: Tensor, conv_state: Tensor, ssm_state: Tensor, mods: Tensor,
                final_mods: Tensor, cfg_scale: Tensor, temperature: Tensor):
        model = self.model
        tok = tokens.repeat(2)
        hidden = model.embed_tokens(tok, position.expand_as(tok))
        logits, state = model.step(hidden, DecodeState(conv_state, ssm_state), Modulations(mods, final_mods), self.ssm_op)
        return self.cfg_op(logits, cfg_scale, temperature), state.conv, state.ssm


class VQDecoderGraph(nn.Module):
    """tokens[B, h*w] → images[B, 3, H, W] in [-1, 1], or uint8 [B, H, W, 3] (clamp, (x + 1) * 127.5, round)."""

    def __init__(self, vq, num_tokens: int, uint8: bool = False):
        super().__init__()
        self.vq, self.uint8 = vq, uint8
        self.side = int(round(num_tokens ** 0.5))

    def forward(self, tokens: Tensor):
        quant = self.vq.codebook()[tokens].reshape(-1, self.side, self.side, self.vq.config.embed_dim).permute(0, 3, 1, 2)
        images = self.vq.decode_latent(quant)
        if self.uint8:
            return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        return images


def _cfg_mix_portable(logits: Tensor, cfg_scale: Tensor, temperature: Tensor) -> Tensor:
    half = logits.shape[0] // 2
    return ops.cfg_mix(logits[:half], logits[half:], cfg_scale, temperature)
