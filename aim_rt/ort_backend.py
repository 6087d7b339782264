"""The `onnxruntime` backend: runs an export directory's graphs with the reference sampler's seeds and settings.

Providers as onnxruntime allows: CUDA when onnxruntime-gpu is installed and sees a GPU, else CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import AiMConfig, VQConfig
from .errors import AiMError
from .sampling import SamplingSettings, check_request, draw


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

        self.prefill = session(f"{variant}/prefill")
        self.step = session(f"{variant}/step")
        self.vq = session("vq_decoder") if "vq_decoder" in self.manifest["graphs"] else None
        self.vq_config = VQConfig.from_official(self.manifest["vq_config"]) if self.manifest["vq_config"] else None

    def sample(self, classes, seeds, settings: SamplingSettings, prefix=None):
        cfg = self.config
        classes, seeds, prefix = check_request(cfg.num_classes, cfg.num_tokens, cfg.vocab_size, classes, seeds, prefix)
        start = 0 if prefix is None else prefix.shape[1]
        if start != self.prefix_len:
            raise AiMError(f"this export's prefill graph takes a prefix of {self.prefix_len} tokens, the request has "
                           f"{start}; export with `aim-rt export --prefix-len {start}`")
        scale = np.array(settings.cfg_scale, dtype=np.float32)
        temp = np.array(settings.temperature, dtype=np.float32)
        feed = {"classes": classes.numpy(), "cfg_scale": scale, "temperature": temp}
        if start:
            feed.update(prefix=prefix.numpy(), position_offset=np.array(settings.position_offset, dtype=np.int64))
        mixed, conv, ssm, mods, fmods = self.prefill.run(None, feed)
        out = torch.empty(classes.shape[0], cfg.num_tokens, dtype=torch.long)
        if start:
            out[:, :start] = prefix
        for k in range(start, cfg.num_tokens):
            tok = draw(torch.from_numpy(mixed), seeds, k, settings)
            out[:, k] = tok
            if k + 1 == cfg.num_tokens:
                break
            mixed, conv, ssm = self.step.run(None, {
                "tokens": tok.numpy(), "position": np.array(k + settings.position_offset, dtype=np.int64),
                "conv_state": conv, "ssm_state": ssm, "mods": mods, "final_mods": fmods,
                "cfg_scale": scale, "temperature": temp,
            })
        return out

    def decode(self, tokens):
        if self.vq is None:
            raise AiMError(f"{self.dir} has no VQ decoder graph (the model had no tokenizer)")
        images = self.vq.run(None, {"tokens": np.asarray(tokens, dtype=np.int64)})[0]
        if self.manifest.get("vq_uint8"):  # NHWC uint8 → the float NCHW images the interface promises
            return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        return torch.from_numpy(images).float()
