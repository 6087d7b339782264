"""`aim-rt doctor`: what this machine can run, and which backends `generate` will accept."""

from __future__ import annotations

import importlib.util
import platform


def _installed(module: str) -> bool:
    """find_spec of a dotted name imports its parents, and raises when a parent is missing (no `cuda` package)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _version(module: str) -> str | None:
    if not _installed(module):
        return None
    try:
        mod = importlib.import_module(module)
        return getattr(mod, "__version__", "installed")
    except Exception as e:  # present but broken is worth saying
        return f"broken ({type(e).__name__}: {e})"


def report() -> dict:
    import torch

    info: dict = {"python": platform.python_version(), "torch": torch.__version__,
                  "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info["gpu"] = f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"
        info["cuda_runtime"] = torch.version.cuda
    info["tensorrt"] = _version("tensorrt")
    info["tensorrt_rtx"] = _version("tensorrt_rtx_bindings")
    info["tensorrt.plugin"] = _installed("tensorrt.plugin")
    info["cuda-python"] = _version("cuda.bindings")
    nvrtc = None
    if info["cuda-python"]:
        try:
            from cuda.bindings import nvrtc as _nvrtc

            err, major, minor = _nvrtc.nvrtcVersion()
            nvrtc = f"{major}.{minor}" if int(err) == 0 else None
        except Exception as e:
            nvrtc = f"missing ({type(e).__name__})"
    info["nvrtc"] = nvrtc
    info["onnx"] = _version("onnx")
    info["onnxruntime"] = _version("onnxruntime")
    if info["onnxruntime"]:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    info["mamba_ssm"] = _version("mamba_ssm")

    backends = {"torch": "yes (CPU" + (" and CUDA)" if torch.cuda.is_available() else ")")}
    backends["onnxruntime"] = "yes" if info["onnxruntime"] and info["onnx"] else "no: pip install 'aim-rt[onnx]'"
    if not torch.cuda.is_available():
        backends["cuda"] = "no: needs a CUDA GPU"
    elif not (nvrtc and nvrtc[0].isdigit()):
        backends["cuda"] = "no: needs cuda-python with NVRTC (pip install 'aim-rt[cuda]')"
    else:
        backends["cuda"] = "yes"
    if info["tensorrt"] and torch.cuda.is_available():
        backends["tensorrt"] = "yes (engines built here)"
    elif info["tensorrt_rtx"]:
        backends["tensorrt"] = "build only: TensorRT-RTX builds engines; it runs them only on its supported GPUs"
    else:
        backends["tensorrt"] = "no: TensorRT >= 10 is not installed"
    info["backends"] = backends
    return info
