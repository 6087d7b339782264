"""Loading checkpoints as users have them, with every key and shape checked.

Accepted:
  * a directory with config.json and model.safetensors or pytorch_model.bin (hub snapshots look like this);
  * a single weights file (.safetensors / .bin / .pt / .pth) with a config: passed explicitly, or NAME.json
    beside NAME.safetensors, or config.json in the same directory;
  * a Hugging Face hub id ("hp-l33/aim-base") or a preset name ("AiM-B"), fetched with huggingface_hub;
  * key layouts: the hub's `mamba.*` + `vqvae.*`, stage-2-only files without the prefix
    (MambaLMHeadModel.save_pretrained), LlamaGen's `{"model": state_dict}` VQ files.
Tensors named `golden.*` (test vectors) are ignored. Pickles load with weights_only=True.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import PRESET_HUB_IDS, AiMConfig, VQConfig
from .errors import CheckpointError, ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_STAGE2_ROOTS = ("backbone.", "lm_head.")
_VQ_ROOTS = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")
# Buffers the official modules carry that do not affect inference.
_IGNORED_KEYS = {"quantize.codebook_used"}


@dataclass
class Checkpoint:
    """What a checkpoint holds, split by stage, before any module is built."""

    source: str
    files: list[Path]
    stage2: dict[str, Tensor] = field(default_factory=dict)
    vq: dict[str, Tensor] = field(default_factory=dict)
    stage2_config: AiMConfig | None = None
    vq_config: VQConfig | None = None
    # Sampling settings a model's author recommends (config.json "aim_rt_sampling"); CLI flags override them.
    sampling_defaults: dict[str, Any] = field(default_factory=dict)

    _sha256: str | None = field(default=None, repr=False, compare=False)

    def sha256(self) -> str:
        """Content hash of the weight files (manifests and resume checks use it); read once, then remembered."""
        if self._sha256 is None:
            h = hashlib.sha256()
            for f in self.files:
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
            self._sha256 = h.hexdigest()
        return self._sha256


# ----- reading files ------------------------------------------------------------------------------
def read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e
    if suffix in (".bin", ".pt", ".pth"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for bad pickles; all mean the same to the user
            raise CheckpointError(
                f"{path} could not be loaded with torch.load(weights_only=True) (corrupt, truncated, or it pickles "
                f"code rather than tensors): {e}") from e
        for wrapper in ("model", "state_dict"):  # LlamaGen {"model": ...}, Lightning {"state_dict": ...}
            if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise CheckpointError(f"{path} does not hold a state dict of tensors")
        return obj
    raise CheckpointError(f"unsupported checkpoint file type {path.suffix!r} ({path}); expected one of {WEIGHT_SUFFIXES}")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read config {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"config {path} holds a JSON {type(data).__name__}, not an object of config fields; "
                              "pass the model's config.json")
    return data


def split_state_dict(sd: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Sort keys into stage 2 and VQ, dropping `golden.*`; unknown roots are an error naming the key."""
    stage2, vq = {}, {}
    for key, value in sd.items():
        if key.startswith("golden."):
            continue
        if key.startswith("mamba."):
            stage2[key[len("mamba."):]] = value
        elif key.startswith("vqvae."):
            vq[key[len("vqvae."):]] = value
        elif key.startswith(_STAGE2_ROOTS):
            stage2[key] = value
        elif key.startswith(_VQ_ROOTS):
            vq[key] = value
        else:
            raise CheckpointError(f"{source}: unknown key {key!r} (neither an AiM stage-2 nor a VQ tokenizer weight)")
    return stage2, vq


def _configs_from(data: dict[str, Any]) -> tuple[AiMConfig | None, VQConfig | None]:
    """Config JSON forms: official MambaConfig fields (+ optional `vq_config`), or {"kind", "config"} (goldens)."""
    if "config" in data and isinstance(data["config"], dict):
        kind = data.get("kind")
        inner = data["config"]
        if kind == "vq":
            return None, VQConfig.from_official(inner)
        data = inner
    stage2 = AiMConfig.from_official(data) if "d_model" in data else None
    vq = VQConfig.from_official(data["vq_config"]) if isinstance(data.get("vq_config"), dict) else None
    return stage2, vq


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and not os.path.exists(name)


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CheckpointError("huggingface_hub is not installed; pass a local checkpoint directory") from e
    try:
        path = snapshot_download(repo_id=repo_id, allow_patterns=["*.json", "*.safetensors", "*.bin"])
    except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
        raise CheckpointError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). If this machine is "
            f"offline, download the repository elsewhere (huggingface-cli download {repo_id}) and pass its directory."
        ) from e
    return Path(path)


def open_checkpoint(path_or_id: str | os.PathLike, config: str | os.PathLike | dict | None = None) -> Checkpoint:
    """Find the weights and config for a path, file, hub id or preset name; read and split the weights."""
    name = str(path_or_id)
    if name in PRESET_HUB_IDS or name.lower() in {k.lower() for k in PRESET_HUB_IDS}:
        name = next(v for k, v in PRESET_HUB_IDS.items() if k.lower() == name.lower())
    path = Path(name).expanduser()
    if not path.exists():
        if _looks_like_hub_id(name):
            path = _hub_snapshot(name)
        else:
            raise CheckpointError(f"no such checkpoint file or directory: {name}")

    if path.is_dir():
        candidates = [path / n for n in ("model.safetensors", "pytorch_model.bin")]
        files = [c for c in candidates if c.is_file()][:1]
        if not files:
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in WEIGHT_SUFFIXES)
        if not files:
            raise CheckpointError(f"{path} holds no weights (model.safetensors, pytorch_model.bin, *.safetensors, *.pt)")
        config_path = path / "config.json"
    else:
        files = [path]
        config_path = path.with_suffix(".json")
        if not config_path.is_file():
            config_path = path.parent / "config.json"

    ckpt = Checkpoint(source=str(path), files=files)
    if isinstance(config, dict):
        config_data = config
    elif config is not None:
        config_data = read_json(Path(config))
    elif config_path.is_file():
        config_data = read_json(config_path)
    else:
        config_data = None

    for f in files:
        stage2, vq = split_state_dict(read_state_dict(f), str(f))
        ckpt.stage2.update(stage2)
        ckpt.vq.update(vq)
    if config_data is not None:
        try:
            ckpt.stage2_config, ckpt.vq_config = _configs_from(config_data)
            if isinstance(config_data.get("aim_rt_sampling"), dict):
                ckpt.sampling_defaults = dict(config_data["aim_rt_sampling"])
        except ConfigError as e:
            raise CheckpointError(f"config for {path}: {e}") from None
    if ckpt.vq and ckpt.vq_config is None and ckpt.stage2_config is not None:
        ckpt.vq_config = VQConfig()  # hub checkpoints carry the default VQ-f16 tokenizer without a config
    return ckpt


# ----- validating against a module ----------------------------------------------------------------
def check_keys(expected: dict[str, torch.Size], got: dict[str, Tensor], source: str,
               optional: set[str] = frozenset()) -> None:
    """Every expected key present with its shape, nothing unexpected; the message names the first offender."""
    for key, shape in expected.items():
        if key not in got:
            if key in optional:
                continue
            raise CheckpointError(f"{source}: missing key {key!r} (expected shape {tuple(shape)})")
        if tuple(got[key].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(got[key].shape)} but the config expects {tuple(shape)}")
    for key in got:
        if key not in expected and key not in _IGNORED_KEYS:
            raise CheckpointError(f"{source}: unexpected key {key!r} for this config")
    for key, value in got.items():
        if key in expected and value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{source}: key {key!r} holds NaN or infinite values")


def load_weights(module: torch.nn.Module, got: dict[str, Tensor], source: str, optional: set[str] = frozenset()) -> None:
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_keys(expected, got, source, optional)
    module.load_state_dict({k: v for k, v in got.items() if k in expected}, strict=False)


def check_config_against_weights(cfg: AiMConfig, stage2: dict[str, Tensor], source: str) -> None:
    """The config's sizes against the weights' shapes, before any module is built: a config that does not match
    its weights (n_layer: 1000000, a wrong d_model) fails at once, naming the config field, instead of first
    building a model that may not fit in memory."""
    layers = {int(k.split(".")[2]) for k in stage2 if k.startswith("backbone.layers.") and k.split(".")[2].isdigit()}
    if len(layers) != cfg.n_layer:
        raise CheckpointError(f"{source}: config field 'n_layer' is {cfg.n_layer} but the weights hold "
                              f"{len(layers)} layers (backbone.layers.*); fix n_layer in config.json")
    expected = {  # key: (shape the config implies, the config fields that decide it)
        "backbone.embeddings.word_embeddings.weight": ((cfg.vocab_size, cfg.d_model), "vocab_size, d_model"),
        "backbone.embeddings.position_embeddings.weight": ((cfg.num_tokens + 1, cfg.d_model), "num_tokens"),
        "backbone.cls_embed.embedding_table.weight": ((cfg.num_classes + 1, cfg.d_model), "num_classes"),
        "backbone.layers.0.mixer.in_proj.weight": ((cfg.d_in_proj, cfg.d_model),
                                                   "d_model, expand, d_state, headdim, ngroups (ssm_cfg)"),
        "backbone.layers.0.mixer.conv1d.weight": ((cfg.conv_dim, 1, cfg.d_conv), "d_conv, d_state (ssm_cfg)"),
    }
    for key, (shape, fields) in expected.items():
        if key in stage2 and tuple(stage2[key].shape) != shape:
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(stage2[key].shape)} but the config "
                                  f"({fields}) implies {shape}; fix config.json")
