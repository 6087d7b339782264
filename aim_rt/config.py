"""Model configurations: the stage-2 (AiM) config, the VQ config, and the official presets as data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class AiMConfig:
    """The fields of the official `MambaConfig` that change what the model computes.

    Mamba2 mixer constants (d_state, d_conv, expand, headdim, ngroups) are the mamba_ssm defaults the
    official checkpoints were trained with; they are fields so that `ssm_cfg` overrides are honoured.
    """

    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 16384
    num_classes: int = 1000
    num_tokens: int = 256
    adaln_group: bool = False
    num_groups: int = 1
    tie_embeddings: bool = True
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "vocab_size", "num_classes", "num_tokens", "num_groups",
                     "d_state", "d_conv", "expand", "headdim", "ngroups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.d_inner % self.headdim:
            raise ConfigError(f"d_inner = expand * d_model = {self.d_inner} is not a multiple of headdim {self.headdim}")
        if self.d_inner % self.ngroups:
            raise ConfigError(f"d_inner {self.d_inner} is not a multiple of ngroups {self.ngroups}")
        side = int(round(self.num_tokens ** 0.5))
        if side * side != self.num_tokens:
            raise ConfigError(f"num_tokens must be a square (a square latent grid), got {self.num_tokens}")

    # Derived sizes, named as in mamba_ssm's Mamba2.
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def d_in_proj(self) -> int:
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    @property
    def groups(self) -> int:
        """Number of adaLN groups actually used (1 means per-layer adaLN)."""
        return self.num_groups if self.adaln_group else 1

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def grid_size(self) -> int:
        return int(round(self.num_tokens ** 0.5))

    @classmethod
    def from_official(cls, data: dict[str, Any]) -> "AiMConfig":
        """Build from an official `config.json` (MambaConfig fields); unknown fields are ignored."""
        if not isinstance(data, dict):
            raise ConfigError(f"stage-2 config must be a JSON object, got {type(data).__name__}")
        if "d_model" not in data or "n_layer" not in data:
            raise ConfigError("stage-2 config lacks 'd_model'/'n_layer': is this an AiM config.json?")
        if data.get("d_intermediate", 0):
            raise ConfigError("d_intermediate != 0 (an MLP after each mixer) is not used by any AiM model")
        if data.get("attn_layer_idx"):
            raise ConfigError("attention layers (attn_layer_idx) are not used by any AiM model")
        ssm = dict(data.get("ssm_cfg") or {})
        layer = ssm.pop("layer", "Mamba1")
        if layer != "Mamba2":
            raise ConfigError(f"ssm_cfg.layer must be 'Mamba2' for AiM, got {layer!r}")
        known = {"d_state", "d_conv", "expand", "headdim", "ngroups"}
        unknown = set(ssm) - known
        if unknown:
            raise ConfigError(f"unsupported ssm_cfg fields: {sorted(unknown)}")
        if not data.get("rms_norm", True):
            raise ConfigError("rms_norm=false (LayerNorm blocks) is not used by any AiM model")
        return cls(
            d_model=data["d_model"],
            n_layer=data["n_layer"],
            vocab_size=data.get("vocab_size", 16384),
            num_classes=data.get("num_classes", 1000),
            num_tokens=data.get("num_tokens", data.get("num_img_tokens", 256)),
            adaln_group=bool(data.get("adaln_group", False)),
            num_groups=data.get("num_groups", data.get("n_groups", 1)),
            tie_embeddings=bool(data.get("tie_embeddings", True)),
            **ssm,
        )

    def to_official(self) -> dict[str, Any]:
        """The official config.json layout, so checkpoints we write load in the official code too."""
        ssm_cfg: dict[str, Any] = {"layer": "Mamba2"}
        defaults = AiMConfig()
        for name in ("d_state", "d_conv", "expand", "headdim", "ngroups"):
            if getattr(self, name) != getattr(defaults, name):
                ssm_cfg[name] = getattr(self, name)
        return {
            "d_model": self.d_model, "d_intermediate": 0, "n_layer": self.n_layer,
            "vocab_size": self.vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {},
            "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
            "pad_vocab_size_multiple": 8, "tie_embeddings": self.tie_embeddings,
            "num_classes": self.num_classes, "num_tokens": self.num_tokens,
            "adaln_group": self.adaln_group, "num_groups": self.num_groups,
            "token_drop": 0.0, "mixer_drop": 0.0, "mlp_drop": 0.0,
        }

    def replace(self, **changes: Any) -> "AiMConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class VQConfig:
    """LlamaGen VQ-f16 tokenizer config (the official VQConfig fields)."""

    n_embed: int = 16384
    embed_dim: int = 8
    z_channels: int = 256
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2

    def __post_init__(self) -> None:
        for name in ("n_embed", "embed_dim", "z_channels", "in_channels", "out_channels", "ch", "num_res_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"VQ config field {name!r} must be a positive integer, got {value!r}")
        if not self.ch_mult or any((not isinstance(m, int)) or m <= 0 for m in self.ch_mult):
            raise ConfigError(f"VQ config field 'ch_mult' must be a list of positive integers, got {self.ch_mult!r}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_official(cls, data: dict[str, Any]) -> "VQConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"VQ config must be a JSON object, got {type(data).__name__}")
        ch = data.get("ch", 128)
        # The official dataclass declares `ch: int = 128,` (a tuple) and never passes it to the
        # encoder/decoder, so configs in the wild carry [128]; a one-element list means that value.
        if isinstance(ch, (list, tuple)):
            if len(ch) != 1:
                raise ConfigError(f"VQ config field 'ch' must be an integer, got {ch!r}")
            ch = ch[0]
        return cls(
            n_embed=data.get("n_embed", 16384),
            embed_dim=data.get("embed_dim", 8),
            z_channels=data.get("z_channels", 256),
            in_channels=data.get("in_channels", 3),
            out_channels=data.get("out_channels", 3),
            ch=ch,
            ch_mult=tuple(data.get("ch_mult", (1, 1, 2, 2, 4))),
            num_res_blocks=data.get("num_res_blocks", 2),
        )

    def to_official(self) -> dict[str, Any]:
        return {
            "n_embed": self.n_embed, "embed_dim": self.embed_dim, "z_channels": self.z_channels,
            "in_channels": self.in_channels, "out_channels": self.out_channels, "ch": self.ch,
            "ch_mult": list(self.ch_mult), "num_res_blocks": self.num_res_blocks,
        }


# The released checkpoints (hp-l33/aim-*). Checked against tests/golden/official_layouts.json.
PRESETS: dict[str, AiMConfig] = {
    "AiM-B": AiMConfig(d_model=768, n_layer=24, adaln_group=False, num_groups=1),
    "AiM-L": AiMConfig(d_model=1024, n_layer=48, adaln_group=True, num_groups=4),
    "AiM-XL": AiMConfig(d_model=1536, n_layer=48, adaln_group=True, num_groups=4),
}

PRESET_HUB_IDS: dict[str, str] = {
    "AiM-B": "hp-l33/aim-base",
    "AiM-L": "hp-l33/aim-large",
    "AiM-XL": "hp-l33/aim-xlarge",
}


def preset(name: str) -> AiMConfig:
    for key, cfg in PRESETS.items():
        if key.lower() == name.lower():
            return cfg
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")

