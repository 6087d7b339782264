"""aim-rt: fast, faithful sampling from AiM (autoregressive image generation with Mamba2)."""

from __future__ import annotations

import os as _os

# In a source checkout the sibling folders exporters/, plugins/, engines/ and cli.py are parts of this
# package (the wheel maps them in); searching the checkout root for submodules makes both layouts import alike.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isdir(_os.path.join(_root, "exporters")):
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821

import importlib as _importlib

__version__ = "0.1.0"

# The public names, imported on first use (PEP 562): `import aim_rt` loads no torch, so the CLI can start
# compiling kernels (NVRTC, in a thread) while torch is still being imported.
_EXPORTS = {
    "AiMConfig": "config", "VQConfig": "config", "PRESETS": "config", "preset": "config",
    "AiMError": "errors", "CheckpointError": "errors", "ConfigError": "errors", "SamplingError": "errors",
    "load_model": "loading", "load_vq": "loading", "random_model": "loading",
    "decode": "decoding", "sample_tokens": "decoding", "sampler_logits": "decoding",
    "SamplingSettings": "sampling",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'aim_rt' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
