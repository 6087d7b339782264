"""The `onnxruntime` backend: an export directory's prefill and step graphs as a `decoding.Decoder`, run by the
one decode loop (so the reference's seeds, settings and tokens).

The graphs end in the CfgMix node (the exported ops.cfg_mix), so a decoder is made for one (cfg_scale,
temperature) and returns mixed logits. Providers as onnxruntime allows: CUDA when onnxruntime-gpu is
installed and sees a GPU, else CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import AiMConfig, VQConfig
from . import decoding
from .errors import AiMError
from .sampling import SamplingSettings


def _providers(ort) -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, export_dir: str | Path, variant: str = "custom", providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise AiMError("the onnxruntime backend needs onnxruntime: pip install 'aim-rt[onnx]'") from None
        from aim_rt.exporters.onnx_export import read_manifest

        if variant not in ("custom", "portable"):
            raise AiMError(f"ONNX variant must be 'custom' or 'portable', got {variant!r}")
        self.dir = Path(export_dir)
        self.manifest = read_manifest(self.dir)
        self.config = AiMConfig.from_official(self.manifest["config"])
        self.prefix_len = self.manifest["prefix_len"]
        self.variant = variant
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.providers = providers or _providers(ort)

        def session(name: str):
            return ort.InferenceSession(str(self.dir / self.manifest["graphs"][name]["file"]), opts,
                                        providers=self.providers)

        self.prefill_session = session(f"{variant}/prefill")
        self.step_session = session(f"{variant}/step")
        self.vq = session("vq_decoder") if "vq_decoder" in self.manifest["graphs"] else None
        self.vq_config = VQConfig.from_official(self.manifest["vq_config"]) if self.manifest["vq_config"] else None

    def decoder(self, settings: SamplingSettings) -> "OnnxRuntimeDecoder":
        return OnnxRuntimeDecoder(self, settings.cfg_scale, settings.temperature)

    def sample(self, classes, seeds, settings: SamplingSettings, prefix=None, teacher=None, return_mixed=False):
        return decoding.decode(self.decoder(settings), classes, seeds, settings, prefix, teacher, return_mixed)

    def decode(self, tokens):
        if self.vq is None:
            raise AiMError(f"{self.dir} has no VQ decoder graph (the model had no tokenizer)")
        images = self.vq.run(None, {"tokens": np.asarray(tokens, dtype=np.int64)})[0]
        if self.manifest.get("vq_uint8"):  # NHWC uint8 → the float NCHW images the interface promises
            return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        return torch.from_numpy(images).float()


class OnnxRuntimeDecoder:
    """The exported prefill and step graphs for one (cfg_scale, temperature); the state is the graphs' arrays."""

    def __init__(self, backend: OnnxRuntimeBackend, cfg_scale: float, temperature: float):
        self.backend, self.config = backend, backend.config
        self.mixed_with = (cfg_scale, temperature)
        self._scalars = {"cfg_scale": np.array(cfg_scale, dtype=np.float32),
                         "temperature": np.array(temperature, dtype=np.float32)}

    def prefill(self, classes, prefix, position_offset: int):
        start = 0 if prefix is None else prefix.shape[1]
        if start != self.backend.prefix_len:
            raise AiMError(f"this export's prefill graph takes a prefix of {self.backend.prefix_len} tokens, the "
                           f"request has {start}; export with `aim-rt export --prefix-len {start}`")
        feed = {"classes": classes.numpy(), **self._scalars}
        if start:
            feed.update(prefix=prefix.numpy(), position_offset=np.array(position_offset, dtype=np.int64))
        mixed, conv, ssm, mods, fmods = self.backend.prefill_session.run(None, feed)
        return torch.from_numpy(mixed), {"conv_state": conv, "ssm_state": ssm, "mods": mods, "final_mods": fmods}

    def step(self, tokens, position: int, state: dict):
        mixed, conv, ssm = self.backend.step_session.run(None, {
            "tokens": tokens.numpy(), "position": np.array(position, dtype=np.int64), **state, **self._scalars})
        return torch.from_numpy(mixed), {**state, "conv_state": conv, "ssm_state": ssm}
