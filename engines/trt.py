"""Which TensorRT this machine has: full TensorRT (`tensorrt`, ≥ 10) or TensorRT-RTX (`tensorrt_rtx_bindings`).

Both expose the same builder API family (Logger, Builder, OnnxParser, Runtime); the code here uses only
that shared part and says which one it used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from aim_rt.errors import AiMError

FLAVOURS = (("tensorrt", "tensorrt"), ("tensorrt_rtx_bindings", "tensorrt-rtx"))


@dataclass(frozen=True)
class TensorRT:
    module: ModuleType
    flavour: str  # "tensorrt" or "tensorrt-rtx"
    version: str


def find_tensorrt() -> TensorRT | None:
    for module_name, flavour in FLAVOURS:
        try:
            mod = importlib.import_module(module_name)
        except ImportError:
            continue
        return TensorRT(mod, flavour, getattr(mod, "__version__", "unknown"))
    return None


def require_tensorrt() -> TensorRT:
    trt = find_tensorrt()
    if trt is None:
        raise AiMError("TensorRT is not installed here: pip install 'aim-rt[tensorrt]' (TensorRT >= 10) on a machine "
                       "with an NVIDIA driver, or use --backend cuda / onnxruntime")
    major = int(trt.version.split(".")[0]) if trt.version[0].isdigit() else 0
    if trt.flavour == "tensorrt" and major < 10:
        raise AiMError(f"TensorRT {trt.version} is too old: aim-rt needs TensorRT >= 10")
    return trt
