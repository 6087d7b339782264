"""The AiM stage-2 model in plain PyTorch: the reference every backend is checked against.

Module and parameter names follow the official `MambaLMHeadModel` so official state dicts load as they are.
Two ways through the model, computing the same function:
  * `forward_sequence`: a whole sequence from a zero state with the chunked scan (training forward, prefill);
  * `step`: one token per row with explicit conv and SSM state (decoding).
The adaLN modulations depend only on the class, so they are computed once (`modulations`) and passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .config import AiMConfig
from .errors import AiMError, SamplingError


def cfg_rows(classes: Tensor, null_class: int) -> Tensor:
    """The official doubled batch: conditional rows, then as many null-class rows."""
    return torch.cat([classes, torch.full_like(classes, null_class)])


@dataclass
class DecodeState:
    """Per-layer recurrent state, stacked: conv (n_layer, B, conv_dim, d_conv), ssm (n_layer, B, H, P, N)."""

    conv: Tensor
    ssm: Tensor


@dataclass
class Modulations:
    """adaLN parameters per row: layers (n_layer, B, 3, d) as shift|scale|gate, final (B, 2, d) as shift|scale."""

    layers: Tensor
    final: Tensor

    def select(self, rows: Tensor) -> "Modulations":
        return Modulations(self.layers[:, rows], self.final[rows])


class Mixer(nn.Module):
    """Mamba2 mixer (mamba_ssm defaults: conv bias, no projection bias, gated RMSNorm after the scan)."""

    def __init__(self, cfg: AiMConfig):
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.d_model, cfg.d_in_proj, bias=False)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim, padding=cfg.d_conv - 1)
        self.dt_bias = nn.Parameter(torch.zeros(cfg.nheads))
        self.A_log = nn.Parameter(torch.zeros(cfg.nheads))
        self.D = nn.Parameter(torch.ones(cfg.nheads))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(cfg.d_inner))
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=False)

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.cfg
        return torch.split(zxbcdt, [cfg.d_inner, cfg.conv_dim, cfg.nheads], dim=-1)

    def forward_sequence(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u: (B, L, d) → out (B, L, d), conv state, ssm state after the last position."""
        cfg = self.cfg
        batch, seqlen, _ = u.shape
        z, xbc, dt = self._split(self.in_proj(u))
        xbc, conv_state = ops.causal_conv1d(xbc, self.conv1d.weight, self.conv1d.bias)
        x, B, C = torch.split(xbc, [cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.ngroups * cfg.d_state], dim=-1)
        x = x.reshape(batch, seqlen, cfg.nheads, cfg.headdim)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        y, ssm_state = ops.ssd_chunked(
            x, dt, A,
            B.reshape(batch, seqlen, cfg.ngroups, cfg.d_state),
            C.reshape(batch, seqlen, cfg.ngroups, cfg.d_state),
        )
        y = y + self.D.float()[:, None] * x.float()
        y = ops.gated_rms_norm(y.reshape(batch, seqlen, cfg.d_inner).to(u.dtype), z, self.norm.weight,
                               cfg.norm_eps, cfg.d_inner // cfg.ngroups)
        return self.out_proj(y), conv_state, ssm_state.to(u.dtype)

    def step(self, u: Tensor, conv_state: Tensor, ssm_state: Tensor, ssm_op=ops.selective_state_update
             ) -> tuple[Tensor, Tensor, Tensor]:
        """u: (B, d) → out (B, d), new conv state, new ssm state. `ssm_op` computes the selective-state update
        (the reference by default; exporters and fast paths pass their implementation of the same op)."""
        cfg = self.cfg
        z, xbc, dt = self._split(self.in_proj(u))
        y, conv_state, ssm_state = ssm_op(
            xbc, z, dt, conv_state, ssm_state, self.conv1d.weight, self.conv1d.bias,
            self.dt_bias, self.A_log, self.D, self.norm.weight,
            headdim=cfg.headdim, d_state=cfg.d_state, ngroups=cfg.ngroups, eps=cfg.norm_eps,
        )
        return self.out_proj(y), conv_state, ssm_state


class Block(nn.Module):
    """Add → RMSNorm (residual kept in fp32) → modulate → mixer → gate."""

    def __init__(self, cfg: AiMConfig):
        super().__init__()
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.mixer = Mixer(cfg)
        if cfg.adaln_group:
            self.scale_shift_table = nn.Parameter(torch.zeros(1, 3, cfg.d_model))
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.d_model, 3 * cfg.d_model))


class FinalLayer(nn.Module):
    def __init__(self, cfg: AiMConfig):
        super().__init__()
        self.norm_final = nn.Module()
        self.norm_final.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.d_model, 2 * cfg.d_model))


class Backbone(nn.Module):
    def __init__(self, cfg: AiMConfig):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embeddings.position_embeddings = nn.Embedding(cfg.num_tokens + 1, cfg.d_model)
        self.cls_embed = nn.Module()
        self.cls_embed.embedding_table = nn.Embedding(cfg.num_classes + 1, cfg.d_model)  # last row: null class
        if cfg.adaln_group:
            self.adaln_group = nn.Sequential(nn.SiLU(), nn.Linear(cfg.d_model, cfg.num_groups * 3 * cfg.d_model))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = nn.Module()
        self.norm_f.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.final_layer = FinalLayer(cfg)


class AiM(nn.Module):
    """AiM stage 2 (class-conditional, raster order). docs/SEMANTICS.md states every convention."""

    def __init__(self, cfg: AiMConfig):
        super().__init__()
        self.config = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.word_embeddings.weight
        self.vq = None  # attached by the loader when the checkpoint carries a tokenizer
        self.source = "unsaved"  # where the weights came from (set by the loaders)
        self.sampling_defaults: dict = {}

    # ----- pieces -------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def class_embedding(self, classes: Tensor) -> Tensor:
        return self.backbone.cls_embed.embedding_table(classes)

    def modulations(self, cond: Tensor) -> Modulations:
        """adaLN shift/scale/gate of every layer and of the final layer, from class embeddings (B, d).

        adaLN-group: one Linear makes G groups of (3, d); layer i uses group i % G plus its own table.
        """
        cfg, bb = self.config, self.backbone
        if cfg.adaln_group:
            groups = bb.adaln_group(cond).view(-1, cfg.num_groups, 3, cfg.d_model)
            layers = [blk.scale_shift_table + groups[:, i % cfg.num_groups] for i, blk in enumerate(bb.layers)]
        else:
            layers = [blk.adaLN_modulation(cond).view(-1, 3, cfg.d_model) for blk in bb.layers]
        final = bb.final_layer.adaLN_modulation(cond).view(-1, 2, cfg.d_model)
        return Modulations(torch.stack(layers), final)

    def embed_tokens(self, tokens: Tensor, positions: Tensor) -> Tensor:
        emb = self.backbone.embeddings
        return emb.word_embeddings(tokens) + emb.position_embeddings(positions)

    def _head(self, hidden: Tensor, residual: Tensor, mods: Modulations) -> Tensor:
        cfg, bb = self.config, self.backbone
        residual = residual + hidden.float()
        h = ops.rms_norm(residual, bb.norm_f.weight, cfg.norm_eps).to(self.dtype)
        h = ops.rms_norm(h, bb.final_layer.norm_final.weight, cfg.norm_eps)
        shift, scale = mods.final.unbind(1)
        if h.dim() == 3:
            shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
        h = h * (1 + scale) + shift
        return self.lm_head(h)

    def _block_input(self, i: int, hidden: Tensor, residual: Tensor | None, mods: Modulations) -> tuple[Tensor, Tensor, Tensor]:
        blk = self.backbone.layers[i]
        residual = hidden.float() if residual is None else residual + hidden.float()
        normed = ops.rms_norm(residual, blk.norm.weight, self.config.norm_eps).to(self.dtype)
        shift, scale, gate = mods.layers[i].unbind(1)
        if normed.dim() == 3:
            shift, scale, gate = shift.unsqueeze(1), scale.unsqueeze(1), gate.unsqueeze(1)
        return normed * (1 + scale) + shift, gate, residual

    # ----- the two paths ------------------------------------------------------------------------
    def forward_sequence(self, hidden: Tensor, mods: Modulations) -> tuple[Tensor, DecodeState]:
        """hidden: (B, L, d) input embeddings → logits (B, L, V) and the state after position L-1."""
        residual = None
        convs, ssms = [], []
        for i, blk in enumerate(self.backbone.layers):
            u, gate, residual = self._block_input(i, hidden, residual, mods)
            out, conv_state, ssm_state = blk.mixer.forward_sequence(u)
            hidden = gate * out
            convs.append(conv_state)
            ssms.append(ssm_state)
        return self._head(hidden, residual, mods), DecodeState(torch.stack(convs), torch.stack(ssms))

    def step(self, hidden: Tensor, state: DecodeState, mods: Modulations, ssm_op=ops.selective_state_update
             ) -> tuple[Tensor, DecodeState]:
        """hidden: (B, d) one input embedding per row → logits (B, V) and the next state."""
        residual = None
        convs, ssms = [], []
        for i, blk in enumerate(self.backbone.layers):
            u, gate, residual = self._block_input(i, hidden, residual, mods)
            out, conv_state, ssm_state = blk.mixer.step(u, state.conv[i], state.ssm[i], ssm_op)
            hidden = gate * out
            convs.append(conv_state)
            ssms.append(ssm_state)
        return self._head(hidden, residual, mods), DecodeState(torch.stack(convs), torch.stack(ssms))

    def prefill(self, classes: Tensor, prefix: Tensor | None = None, position_offset=1
                ) -> tuple[Tensor, DecodeState, Modulations]:
        """The sampler's prefill: conditional rows then null-class rows; the class token (no position) and the
        optional prefix (B, m), token k at position k + position_offset, through the chunked path.
        Returns the last position's logits (2B, V), the state after it, and the rows' modulations."""
        rows = cfg_rows(classes, self.config.null_class)
        cond = self.class_embedding(rows)
        mods = self.modulations(cond)
        hidden = cond.unsqueeze(1)
        if prefix is not None:
            positions = torch.arange(prefix.shape[1], device=self.device) + position_offset
            hidden = torch.cat([hidden, self.embed_tokens(prefix.repeat(2, 1), positions)], dim=1)
        logits, state = self.forward_sequence(hidden, mods)
        return logits[:, -1], state, mods

    # ----- public API (external checks call exactly these) --------------------------------------
    def _check_inputs(self, classes: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.config
        classes = torch.as_tensor(classes, device=self.device).long().reshape(-1)
        tokens = torch.as_tensor(tokens, device=self.device).long()
        if tokens.dim() != 2 or tokens.shape[0] != classes.shape[0]:
            raise SamplingError(f"tokens must be (B, N) with B = len(classes) = {classes.shape[0]}, got {tuple(tokens.shape)}")
        if not 1 <= tokens.shape[1] <= cfg.num_tokens:
            raise SamplingError(f"tokens must have 1..{cfg.num_tokens} columns, got {tokens.shape[1]}")
        if ((classes < 0) | (classes > cfg.num_classes)).any():
            raise SamplingError(f"classes must lie in [0, {cfg.num_classes}] ({cfg.num_classes} = null class)")
        if ((tokens < 0) | (tokens >= cfg.vocab_size)).any():
            raise SamplingError(f"tokens must lie in [0, {cfg.vocab_size})")
        return classes, tokens

    @torch.no_grad()
    def teacher_logits(self, classes: Tensor, tokens: Tensor) -> Tensor:
        """The training forward: [class, tok_0 + pos_0, ..., tok_{N-2} + pos_{N-2}] → (B, N, V); row j predicts tok_j.

        No label dropout (the official code drops 10% of labels whenever no inference params are passed).
        """
        classes, tokens = self._check_inputs(classes, tokens)
        cond = self.class_embedding(classes)
        inputs = tokens[:, :-1]
        positions = torch.arange(inputs.shape[1], device=self.device)
        hidden = torch.cat([cond.unsqueeze(1), self.embed_tokens(inputs, positions)], dim=1)
        logits, _ = self.forward_sequence(hidden, self.modulations(cond))
        return logits.float()

    @torch.no_grad()
    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """Tokens (B, h*w) on a square grid → images (B, 3, H, W) in [-1, 1] through the attached VQ decoder."""
        if self.vq is None:
            raise AiMError("this checkpoint has no VQ tokenizer: load one with aim_rt.load_vq(path) and call its decode_tokens")
        return self.vq.decode_tokens(tokens)
