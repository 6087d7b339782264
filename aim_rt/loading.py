"""Public loaders: checkpoints → reference modules on a device and dtype; random models for benchmarks."""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import Checkpoint, check_config_against_weights, load_weights, open_checkpoint
from .config import AiMConfig, VQConfig, preset
from .errors import AiMError, CheckpointError
from .model import AiM
from .vq import VQModel

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@contextlib.contextmanager
def _weights_assigned_after():
    """Build modules without torch's default parameter init, for callers that assign every weight right after
    (checkpoint loading checks that every key is present; random_model fills every parameter). The default
    init's random draws took 1.5 s of building AiM-B on a CPU, for values that are overwritten."""
    classes = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
    saved = [c.reset_parameters for c in classes]
    try:
        for c in classes:
            c.reset_parameters = lambda self: None
        yield
    finally:
        for c, f in zip(classes, saved):
            c.reset_parameters = f

def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype → the name used in manifests, kernel builds and the CLI."""
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
        raise AiMError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise AiMError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16") from None


_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """auto, cpu, cuda or cuda:N (a GPU that exists); anything else (gpu0, meta, mps) is refused by name."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _DEVICE.fullmatch(str(device)):
        raise AiMError(f"--device {str(device)!r} is not supported; use auto, cpu, cuda or cuda:N")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AiMError(f"--device {device!r} was requested but no CUDA GPU is visible to torch; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise AiMError(f"--device {device!r}: this machine has {torch.cuda.device_count()} GPU(s) "
                       f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


def _build_vq(ckpt: Checkpoint) -> VQModel:
    cfg = ckpt.vq_config or VQConfig()
    with_encoder = any(k.startswith("encoder.") for k in ckpt.vq)
    with _weights_assigned_after():
        vq = VQModel(cfg, with_encoder=with_encoder)
    load_weights(vq, ckpt.vq, f"{ckpt.source} (VQ tokenizer)")
    return vq


def _build_stage2(ckpt: Checkpoint) -> AiM:
    cfg = ckpt.stage2_config
    if cfg is None:
        raise CheckpointError(
            f"{ckpt.source}: no stage-2 config found; put config.json beside the weights or pass config=...")
    check_config_against_weights(cfg, ckpt.stage2, ckpt.source)
    with _weights_assigned_after():
        model = AiM(cfg)
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()
    load_weights(model, ckpt.stage2, ckpt.source, optional)
    if cfg.tie_embeddings and "lm_head.weight" in ckpt.stage2:
        if not torch.equal(ckpt.stage2["lm_head.weight"], ckpt.stage2["backbone.embeddings.word_embeddings.weight"]):
            raise CheckpointError(
                f"{ckpt.source}: tie_embeddings is true but 'lm_head.weight' differs from the word embeddings")
        # load_state_dict wrote lm_head last into the shared tensor; restore the embedding as the source of truth
        model.backbone.embeddings.word_embeddings.weight.data.copy_(ckpt.stage2["backbone.embeddings.word_embeddings.weight"])
    return model


@dataclass
class LoadedModel:
    """A loaded model and what the loader knows about it; the module itself carries no loader metadata."""

    model: AiM
    sha256: str | None  # content hash of the weight files (None for weights without files)
    source: str
    sampling_defaults: dict[str, Any] = field(default_factory=dict)  # config.json "aim_rt_sampling"


def load(path_or_id: str | os.PathLike, device: str | torch.device | None = "cpu",
         dtype: str | torch.dtype = torch.float32, config=None) -> LoadedModel:
    """Load an AiM checkpoint (directory, file, hub id or preset name) as the reference model, with its hash."""
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    return build(open_checkpoint(path_or_id, config), dev, dt)


def build(ckpt: Checkpoint, device: str | torch.device | None = "cpu",
          dtype: str | torch.dtype = torch.float32) -> LoadedModel:
    """The reference model from an opened checkpoint (config checked against the weights before building).

    Nothing keeps the read state dicts: once the caller drops `ckpt`, each weight is held once, by the module.
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if not ckpt.stage2:
        raise CheckpointError(f"{ckpt.source} holds no AiM stage-2 weights (a VQ tokenizer only? use aim_rt.load_vq)")
    model = _build_stage2(ckpt)
    if ckpt.vq:
        attach_vq(model, _build_vq(ckpt))
    # Kept on the module only while model.py still declares these (other code reads them); nothing here relies on it.
    model.source = ckpt.source
    model.sampling_defaults = dict(ckpt.sampling_defaults)
    return LoadedModel(model.to(dev, dt).eval(), ckpt.sha256(), ckpt.source, dict(ckpt.sampling_defaults))


def load_model(path_or_id: str | os.PathLike, device: str | torch.device | None = "cpu",
               dtype: str | torch.dtype = torch.float32, config=None) -> AiM:
    """Load an AiM checkpoint (directory, file, hub id or preset name) as the reference model.

    The VQ tokenizer is attached when the checkpoint carries one (`model.decode_tokens`).
    """
    return load(path_or_id, device, dtype, config).model


def attach_vq(model: AiM, vq: VQModel) -> AiM:
    """Use `vq` to decode this model's tokens; its codebook must match the vocabulary."""
    if vq.config.n_embed != model.config.vocab_size:
        raise CheckpointError(
            f"VQ codebook has {vq.config.n_embed} entries but the model's vocabulary has {model.config.vocab_size}")
    model.vq = vq.to(model.device, model.dtype).eval()
    return model


def load_vq(path: str | os.PathLike, device: str | torch.device | None = "cpu",
            dtype: str | torch.dtype = torch.float32, config=None) -> VQModel:
    """Load a VQ tokenizer: LlamaGen's {"model": ...} .pt, a full AiM checkpoint, or a VQ safetensors + json."""
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    ckpt = open_checkpoint(path, config)
    if not ckpt.vq:
        raise CheckpointError(f"{ckpt.source} holds no VQ tokenizer weights")
    return _build_vq(ckpt).to(dev, dt).eval()


def random_model(cfg: AiMConfig | str, seed: int = 0, device="cpu", dtype=torch.float32) -> AiM:
    """An AiM with random weights at a given shape (benchmarks, tests). Init follows mamba_ssm's ranges,
    with the zero-initialised adaLN layers made random so that every path is exercised."""
    if isinstance(cfg, str):
        cfg = preset(cfg)
    g = torch.Generator().manual_seed(seed)
    with _weights_assigned_after():
        model = AiM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty(p.shape).uniform_(1, 16, generator=g)))
            elif name.endswith("dt_bias"):
                dt = torch.exp(torch.empty(p.shape).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            elif name.endswith(".D") or "norm" in name.split(".")[-2]:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 or name.endswith("scale_shift_table"):
                fan_in = p.shape[-1] if p.dim() == 2 else max(1, p[0].numel())
                std = 0.02 if "embed" in name else fan_in ** -0.5
                p.copy_(std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    model.source = f"random:{seed}"
    return model.to(resolve_device(device), resolve_dtype(dtype)).eval()


def save_model(model: AiM, directory: str | os.PathLike, sampling_defaults: dict | None = None) -> Path:
    """Write a hub-style checkpoint directory: config.json (official fields, plus `vq_config` and
    `aim_rt_sampling` when present) and model.safetensors with `mamba.*` and `vqvae.*` keys."""
    from safetensors.torch import save_file

    from .outputs import atomic_write_json

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in model.state_dict().items():
        if key.startswith("vq."):
            tensors["vqvae." + key[3:]] = value
        elif not (key == "lm_head.weight" and model.config.tie_embeddings):  # tied: stored once
            tensors["mamba." + key] = value
    config = model.config.to_official()
    if model.vq is not None:
        config["vq_config"] = model.vq.config.to_official()
    recommended = sampling_defaults or getattr(model, "sampling_defaults", None)
    if recommended:
        config["aim_rt_sampling"] = dict(recommended)
    tmp = out / "model.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, out / "model.safetensors")
    atomic_write_json(out / "config.json", config)
    return out
