"""TensorRT plugin for the aim_rt custom ONNX ops, wrapping the kernels of aim_kernels.cu (no second
implementation): `aim_rt::SelectiveStateUpdate` (ops.selective_state_update in Python) → the fused CUDA kernel,
`aim_rt::CfgMix` → ops.cfg_mix in torch.

Registered through `tensorrt.plugin` (TensorRT >= 10.7) with a Python `impl`: the enqueue fills the same
SsuParams struct the native runtime fills and launches on TensorRT's stream, so it is CUDA-graph capturable
once its workspace exists (the runner warms up before capturing). An ahead-of-time implementation (engines
that run without Python, TensorRT >= 10.9) and an IPluginV3 C++ shell are not written yet.

Every torch operation of an enqueue runs on TensorRT's stream (torch.cuda.ExternalStream), and the compiled
kernels are built once per (dtype, device) (`kernels_for`): building them loads a CUDA module.
The attribute (de)serialisation and the kernel cache are plain Python and tested without TensorRT.
"""

from __future__ import annotations

import numpy as np

SELECTIVE_STATE_UPDATE_ATTRS = {"headdim": np.int32, "d_state": np.int32, "ngroups": np.int32, "eps": np.float32}
_registered = False
_kernels: dict[tuple[str, int], object] = {}


def kernels_for(dtype: str, device: int):
    """The compiled kernels for one element type on one device, constructed on first use only."""
    key = (dtype, device)
    if key not in _kernels:
        from .kernels import Kernels

        _kernels[key] = Kernels(dtype, device)
    return _kernels[key]


def encode_fields(attrs: dict) -> dict[str, np.ndarray]:
    """ONNX node attributes → the typed arrays TensorRT plugin fields carry (one element each)."""
    missing = set(SELECTIVE_STATE_UPDATE_ATTRS) - set(attrs)
    if missing:
        raise ValueError(f"SelectiveStateUpdate needs attributes {sorted(missing)}")
    return {name: np.array([attrs[name]], dtype=dtype) for name, dtype in SELECTIVE_STATE_UPDATE_ATTRS.items()}


def decode_fields(fields: dict[str, np.ndarray]) -> dict:
    out = {}
    for name, dtype in SELECTIVE_STATE_UPDATE_ATTRS.items():
        value = np.asarray(fields[name])
        if value.dtype != dtype or value.size != 1:
            raise ValueError(f"plugin field {name!r} must be one {np.dtype(dtype).name}, got {value.dtype} x {value.size}")
        out[name] = value.item()
    return out


def register() -> None:
    """Register both ops with tensorrt.plugin (idempotent). Raises ImportError where it does not exist."""
    global _registered
    if _registered:
        return
    import tensorrt.plugin as trtp  # TensorRT >= 10.7
    import torch

    from aim_rt import ops
    from aim_rt.loading import dtype_name

    from .kernels import ssu_params

    workspaces: dict = {}

    @trtp.register("aim_rt::SelectiveStateUpdate")
    def selective_state_update_desc(
            xbc: trtp.TensorDesc, z: trtp.TensorDesc, dt: trtp.TensorDesc, conv_state: trtp.TensorDesc,
            ssm_state: trtp.TensorDesc, conv_weight: trtp.TensorDesc, conv_bias: trtp.TensorDesc,
            dt_bias: trtp.TensorDesc, A_log: trtp.TensorDesc, D: trtp.TensorDesc, norm_weight: trtp.TensorDesc,
            headdim: int, d_state: int, ngroups: int, eps: float) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        return z.like(), conv_state.like(), ssm_state.like()

    @trtp.impl("aim_rt::SelectiveStateUpdate")
    def selective_state_update_impl(
            xbc: trtp.Tensor, z: trtp.Tensor, dt: trtp.Tensor, conv_state: trtp.Tensor, ssm_state: trtp.Tensor,
            conv_weight: trtp.Tensor, conv_bias: trtp.Tensor, dt_bias: trtp.Tensor, A_log: trtp.Tensor,
            D: trtp.Tensor, norm_weight: trtp.Tensor, headdim: int, d_state: int, ngroups: int, eps: float,
            outputs: tuple[trtp.Tensor], stream: int) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            t = [torch.as_tensor(x, device="cuda") for x in (xbc, z, dt, conv_state, ssm_state, conv_weight,
                                                            conv_bias, dt_bias, A_log, D, norm_weight)]
            y, conv_out, ssm_out = (torch.as_tensor(o, device="cuda") for o in outputs)
            device = t[0].device.index
            k = kernels_for(dtype_name(t[0].dtype), device)
            rows, nheads = t[0].shape[0], t[2].shape[1]
            key = (device, rows, nheads)
            if key not in workspaces:  # allocated on the first (uncaptured) run
                workspaces[key] = torch.zeros(rows, nheads, device="cuda")
            names = ("conv_weight", "conv_bias", "dt_bias", "A_log", "D", "norm_weight")
            k.selective_state_update(ssu_params(
                xbc=t[0], z=t[1], dt=t[2], conv_state_in=t[3], conv_state_out=conv_out, ssm_state_in=t[4],
                ssm_state_out=ssm_out, weights=dict(zip(names, t[5:])), sumsq=workspaces[key], y=y,
                headdim=headdim, d_state=d_state, ngroups=ngroups, eps=eps), stream, finish=True)

    @trtp.register("aim_rt::CfgMix")
    def cfg_desc(logits: trtp.TensorDesc, cfg_scale: trtp.TensorDesc, temperature: trtp.TensorDesc
                 ) -> trtp.TensorDesc:
        out = logits.like()
        out.shape_expr = trtp.ShapeExprs([logits.shape_expr[0] // 2, logits.shape_expr[1]])
        out.dtype = trtp.DataType.FLOAT
        return out

    @trtp.impl("aim_rt::CfgMix")
    def cfg_impl(logits: trtp.Tensor, cfg_scale: trtp.Tensor, temperature: trtp.Tensor,
                 outputs: tuple[trtp.Tensor], stream: int) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            x = torch.as_tensor(logits, device="cuda")
            half = x.shape[0] // 2
            out = torch.as_tensor(outputs[0], device="cuda")
            out.copy_(ops.cfg_mix(x[:half], x[half:], torch.as_tensor(cfg_scale, device="cuda"),
                                  torch.as_tensor(temperature, device="cuda")))

    _registered = True
