"""Reference ops in plain PyTorch: the oracle every fast kernel is compared against.

Each function computes in float32 and returns the input dtype, like the mamba_ssm Triton kernels the
official code runs. Shapes use B = rows, L = sequence, H = heads, P = headdim, N = d_state, G = ngroups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int) -> Tensor:
    """mamba_ssm RMSNormGated with norm_before_gate=False: rmsnorm(y * silu(z)) * weight, per group."""
    g = y.float() * F.silu(z.float())
    shape = g.shape
    g = g.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (g.reshape(shape) * weight.float()).to(y.dtype)


def causal_conv1d(xbc: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv + SiLU over a whole sequence.

    xbc: (B, L, C); weight: (C, 1, W); bias: (C,). Returns the activations (B, L, C) and the conv state
    (B, C, W): the last W inputs, zero-padded on the left, as the recurrent step expects.
    """
    seqlen, width = xbc.shape[1], weight.shape[-1]
    x = xbc.transpose(1, 2).float()
    out = F.conv1d(x, weight.float(), bias.float(), padding=width - 1, groups=x.shape[1])[..., :seqlen]
    state = F.pad(x, (max(width - seqlen, 0), 0))[..., -width:]
    return F.silu(out).transpose(1, 2).to(xbc.dtype), state.to(xbc.dtype)


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """Mamba2's state-space-duality scan, chunked, from a zero initial state.

    x: (B, L, H, P); dt: (B, L, H) already softplus'ed; A: (H,) negative; B, C: (B, L, G, N).
    Returns y = sum_j C_i . (prod of decays) dt_j x_j B_j (without the D skip), (B, L, H, P), and the final
    state (B, H, P, N). Within a chunk the quadratic (attention-like) form is used, across chunks the
    recurrence; the result equals running the one-step update L times.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    # Heads share their group's B and C.
    B = B.repeat_interleave(nheads // ngroups, dim=2)
    C = C.repeat_interleave(nheads // ngroups, dim=2)
    pad = (-seqlen) % chunk_size
    if pad:  # dt = 0 on the padding: no decay, no input, so the state is untouched
        x, dt = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
    nchunks = x.shape[1] // chunk_size
    x = x.reshape(batch, nchunks, chunk_size, nheads, headdim)
    dt = dt.reshape(batch, nchunks, chunk_size, nheads)
    B = B.reshape(batch, nchunks, chunk_size, nheads, dstate)
    C = C.reshape(batch, nchunks, chunk_size, nheads, dstate)

    a_cum = torch.cumsum(dt * A, dim=2)  # (b, c, q, h): log-decay from the chunk start
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    seg = a_cum.unsqueeze(3) - a_cum.unsqueeze(2)  # (b, c, i, j, h) = a_cum[i] - a_cum[j]
    decay = torch.exp(seg.masked_fill(~causal[None, None, :, :, None], float("-inf")))
    scores = torch.einsum("bcihn,bcjhn->bcijh", C, B) * decay * dt.unsqueeze(2)
    y = torch.einsum("bcijh,bcjhp->bcihp", scores, x)

    # Each chunk's contribution to the state at its end.
    to_end = torch.exp(a_cum[:, :, -1:, :] - a_cum)  # (b, c, q, h)
    chunk_states = torch.einsum("bcqh,bcqhp,bcqhn->bchpn", to_end * dt, x, B)
    state = x.new_zeros(batch, nheads, headdim, dstate)
    y_off = []
    for c in range(nchunks):
        # The state entering chunk c, seen from each position i through the decay a_cum[i].
        y_off.append(torch.einsum("bqhn,bhpn,bqh->bqhp", C[:, c], state, torch.exp(a_cum[:, c])))
        state = state * torch.exp(a_cum[:, c, -1])[:, :, None, None] + chunk_states[:, c]
    y = y + torch.stack(y_off, dim=1)
    y = y.reshape(batch, nchunks * chunk_size, nheads, headdim)[:, :seqlen]
    return y, state


def selective_state_update(
    xbc: Tensor, z: Tensor, dt: Tensor, conv_state: Tensor, ssm_state: Tensor,
    conv_weight: Tensor, conv_bias: Tensor, dt_bias: Tensor, A_log: Tensor, D: Tensor,
    norm_weight: Tensor, *, headdim: int, d_state: int, ngroups: int, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One decode step of a Mamba2 mixer between in_proj and out_proj: the op the fused kernel implements.

    xbc: (B, conv_dim) = x | B | C before the conv; z: (B, d_inner); dt: (B, H) before softplus;
    conv_state: (B, conv_dim, W); ssm_state: (B, H, P, N). Returns the gated-normed y (B, d_inner) and the
    new conv and SSM states (fresh tensors: callers choose in place or ping-pong).

    conv: shift the window left, append xbc, depthwise conv + bias, SiLU.
    SSM:  dt = softplus(dt + dt_bias); h = h * exp(dt * A) + dt * x (outer) B; y = h . C + D * x.
    norm: y = rmsnorm(y * silu(z)) * w.
    """
    dtype = xbc.dtype
    batch = xbc.shape[0]
    d_inner = z.shape[-1]
    nheads = d_inner // headdim
    conv_state_new = torch.cat([conv_state[..., 1:], xbc.unsqueeze(-1).to(conv_state.dtype)], dim=-1)
    act = (conv_state_new.float() * conv_weight.squeeze(1).float()).sum(-1) + conv_bias.float()
    act = F.silu(act)
    x, Bm, Cm = torch.split(act, [d_inner, ngroups * d_state, ngroups * d_state], dim=-1)
    x = x.reshape(batch, nheads, headdim)
    Bm = Bm.reshape(batch, ngroups, d_state).repeat_interleave(nheads // ngroups, dim=1)  # (B, H, N)
    Cm = Cm.reshape(batch, ngroups, d_state).repeat_interleave(nheads // ngroups, dim=1)
    A = -torch.exp(A_log.float())
    dt = F.softplus(dt.float() + dt_bias.float())  # (B, H)
    dA = torch.exp(dt * A)
    h = ssm_state.float() * dA[:, :, None, None] + (dt[:, :, None] * x).unsqueeze(-1) * Bm.unsqueeze(2)
    y = torch.einsum("bhpn,bhn->bhp", h, Cm) + D.float()[None, :, None] * x
    y = gated_rms_norm(y.reshape(batch, d_inner), z, norm_weight, eps, d_inner // ngroups)
    return y.to(dtype), conv_state_new, h.to(ssm_state.dtype)


def cfg_mix(cond: Tensor, uncond: Tensor, cfg_scale, temperature=1.0) -> Tensor:
    """Classifier-free guidance in logit space, as the official sampler does, then temperature (float32).

    The only place the formula is written: the ONNX CfgMix function body is traced from this function
    (exporters/custom_ops.py) and the TensorRT plugin's CfgMix runs it. `cfg_scale` and `temperature` may be
    Python numbers or 0-d tensors (graph inputs). The official sampler accepts `temperature` and never applies
    it; aim-rt divides by it (1.0 = official: x / 1 is exact, so the division is always written).
    """
    return (uncond.float() + (cond.float() - uncond.float()) * cfg_scale) / temperature
