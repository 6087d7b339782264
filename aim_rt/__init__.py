"""aim-rt: fast, faithful sampling from AiM (autoregressive image generation with Mamba2)."""

from __future__ import annotations

import os as _os

# In a source checkout the sibling folders exporters/, plugins/, engines/ and cli.py are parts of this
# package (the wheel maps them in); searching the checkout root for submodules makes both layouts import alike.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isdir(_os.path.join(_root, "exporters")):
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821

from .config import PRESETS, AiMConfig, VQConfig, preset  # noqa: E402
from .errors import AiMError, CheckpointError, ConfigError, SamplingError  # noqa: E402
from .loading import load_model, load_vq, random_model  # noqa: E402
from .decoding import decode, sample_tokens, sampler_logits  # noqa: E402
from .sampling import SamplingSettings  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AiMConfig", "VQConfig", "PRESETS", "preset", "load_model", "load_vq", "random_model",
    "SamplingSettings", "sample_tokens", "sampler_logits", "decode", "AiMError", "CheckpointError", "ConfigError", "SamplingError",
]
