"""LlamaGen VQ-f16 tokenizer (as AiM ships it) in plain PyTorch; parameter names follow the official VQModel.

Decoding: l2-normalised codebook lookup → post_quant_conv (1x1) → decoder (GroupNorm(32, eps 1e-6), SiLU,
3x3 convs, single-head attention in the middle and at the lowest resolution, nearest x2 upsampling).
The encoder is kept so tokenizers can be trained and images tokenized (prefix completion).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VQConfig
from .errors import SamplingError


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q, k, v = (m(h).reshape(b, c, hh * ww).transpose(1, 2) for m in (self.q, self.k, self.v))
        out = torch.softmax(q @ k.transpose(1, 2) * c ** -0.5, dim=-1) @ v
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, hh, ww))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as taming/LlamaGen


def _level(res: list[nn.Module], attn: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.res, level.attn = nn.ModuleList(res), nn.ModuleList(attn)
    return level


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, nres = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            last = i == len(mult) - 1
            res, attn = [], []
            for _ in range(nres):
                res.append(ResnetBlock(cin, ch * m))
                cin = ch * m
                if last:
                    attn.append(AttnBlock(cin))
            level = _level(res, attn)
            if not last:
                level.downsample = Downsample(cin)
            self.conv_blocks.append(level)
        self.mid = nn.ModuleList([ResnetBlock(cin, cin), AttnBlock(cin), ResnetBlock(cin, cin)])
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            for i, res in enumerate(level.res):
                h = res(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for blk in self.mid:
            h = blk(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, nres = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(cin, cin), AttnBlock(cin), ResnetBlock(cin, cin)])
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(mult))):
            res, attn = [], []
            for _ in range(nres + 1):
                res.append(ResnetBlock(cin, ch * mult[i]))
                cin = ch * mult[i]
                if i == len(mult) - 1:
                    attn.append(AttnBlock(cin))
            level = _level(res, attn)
            if i != 0:
                level.upsample = Upsample(cin)
            self.conv_blocks.append(level)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for blk in self.mid:
            h = blk(h)
        for level in self.conv_blocks:
            for i, res in enumerate(level.res):
                h = res(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig, with_encoder: bool = True):
        super().__init__()
        self.config = cfg
        if with_encoder:
            self.encoder = Encoder(cfg)
            self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.decoder = Decoder(cfg)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(cfg.n_embed, cfg.embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    def codebook(self) -> Tensor:
        return F.normalize(self.quantize.embedding.weight, p=2, dim=-1)

    def decode_latent(self, quant: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(quant))

    @torch.no_grad()
    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """(B, h*w) token ids on a square grid, row-major → images (B, 3, 2^k h, 2^k w), nominally in [-1, 1]."""
        tokens = torch.as_tensor(tokens, device=self.device).long()
        if tokens.dim() != 2:
            raise SamplingError(f"tokens must be (B, h*w), got shape {tuple(tokens.shape)}")
        side = int(round(tokens.shape[1] ** 0.5))
        if side * side != tokens.shape[1]:
            raise SamplingError(f"token count {tokens.shape[1]} is not a square grid")
        if ((tokens < 0) | (tokens >= self.config.n_embed)).any():
            raise SamplingError(f"tokens must lie in [0, {self.config.n_embed})")
        return self.decode_checked(tokens)

    def decode_checked(self, tokens: Tensor) -> Tensor:
        """decode_tokens without the argument checks (they sync with the host; CUDA graphs capture this)."""
        side = int(round(tokens.shape[1] ** 0.5))
        quant = self.codebook()[tokens].reshape(tokens.shape[0], side, side, -1).permute(0, 3, 1, 2)
        return self.decode_latent(quant.contiguous())

    def encode_tokens(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] → nearest-codeword token ids (B, h*w) (cosine, l2-normalised)."""
        z = self.quant_conv(self.encoder(images.to(self.dtype)))
        z = F.normalize(z.permute(0, 2, 3, 1), dim=-1)
        ids = (z @ self.codebook().t()).argmax(-1)
        return ids.reshape(images.shape[0], -1)


def to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8, as the official code saves them: clamp, (x + 1) * 127.5."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu()
