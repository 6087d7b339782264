"""The two custom ONNX ops of the step graph, domain `aim_rt`, version 1.

  aim_rt.SelectiveStateUpdate(xbc, z, dt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D,
                              norm_weight) -> (y, conv_state_out, ssm_state_out)
      attributes: headdim, d_state, ngroups (ints), eps (float).
      One Mamba2 decode step between in_proj and out_proj: shift the conv window and append xbc, depthwise conv
      + bias + SiLU, split x | B | C, dt = softplus(dt + dt_bias), h = h * exp(dt * A) + dt * x (outer) B with
      A = -exp(A_log), y = h . C + D * x, then y = rmsnorm_groups(y * silu(z)) * norm_weight.
      Shapes: xbc (R, C), z (R, Di), dt (R, H), conv_state (R, C, W), ssm_state (R, H, P, N),
      conv_weight (C, 1, W), conv_bias (C), dt_bias/A_log/D (H), norm_weight (Di).
  aim_rt.CfgMix(logits, cfg_scale, temperature) -> mixed
      logits (2B, V): conditional rows then null-class rows; cfg_scale, temperature: float scalars.
      mixed = (u + (c - u) * cfg_scale) / temperature, (B, V), float32.

In the exported graph each op also carries its definition as an ONNX model-local function built from standard
ops, so any ONNX runtime executes the very graph the TensorRT plugin sees (the TensorRT builder drops the
function bodies so that its plugin is used). `ops.selective_state_update` / `ops.cfg_mix` are the references;
CfgMix's body is ops.cfg_mix itself, traced to ONNX, so the formula is written once.

Names: the Python op is `selective_state_update` (ops.py); ONNX op types and TensorRT plugin names are
CamelCase by convention, so the same op is `aim_rt::SelectiveStateUpdate` there (and `CfgMix` for cfg_mix).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from aim_rt import ops

DOMAIN = "aim_rt"
VERSION = 1
SELECTIVE_STATE_UPDATE_INPUTS = ["xbc", "z", "dt", "conv_state", "ssm_state", "conv_weight", "conv_bias", "dt_bias",
                                 "A_log", "D", "norm_weight"]
SELECTIVE_STATE_UPDATE_OUTPUTS = ["y", "conv_state_out", "ssm_state_out"]


# ----- torch side: what the tracer records ----------------------------------------------------------
class SelectiveStateUpdate(torch.autograd.Function):
    """Runs the reference op eagerly; the ONNX exporter records one aim_rt.SelectiveStateUpdate node."""

    @staticmethod
    def forward(ctx, xbc, z, dt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight,
                headdim, d_state, ngroups, eps):
        return ops.selective_state_update(xbc, z, dt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D,
                                        norm_weight, headdim=headdim, d_state=d_state, ngroups=ngroups, eps=eps)

    @staticmethod
    def symbolic(g, xbc, z, dt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight,
                 headdim, d_state, ngroups, eps):
        outs = g.op(f"{DOMAIN}::SelectiveStateUpdate", xbc, z, dt, conv_state, ssm_state, conv_weight, conv_bias,
                    dt_bias, A_log, D, norm_weight, headdim_i=headdim, d_state_i=d_state, ngroups_i=ngroups,
                    eps_f=eps, outputs=3)
        for out, like in zip(outs, (z, conv_state, ssm_state)):
            out.setType(like.type())
        return outs


def selective_state_update_op(xbc, z, dt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D,
                              norm_weight, *, headdim, d_state, ngroups, eps):
    """Drop-in for `ops.selective_state_update` (keyword attributes) that exports as the custom node."""
    return SelectiveStateUpdate.apply(xbc, z, dt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D,
                                      norm_weight, headdim, d_state, ngroups, eps)


class CfgMix(torch.autograd.Function):
    """Runs ops.cfg_mix eagerly; the ONNX exporter records one aim_rt.CfgMix node."""

    @staticmethod
    def forward(ctx, logits, cfg_scale, temperature):
        half = logits.shape[0] // 2
        return ops.cfg_mix(logits[:half], logits[half:], cfg_scale, temperature)

    @staticmethod
    def symbolic(g, logits, cfg_scale, temperature):
        out = g.op(f"{DOMAIN}::CfgMix", logits, cfg_scale, temperature)
        out.setType(logits.type().with_dtype(torch.float32))
        return out


def cfg_mix_tensor_op(logits, cfg_scale, temperature):
    """CFG over a stacked (2B, V) logits tensor with tensor-valued scale and temperature (graph inputs)."""
    return CfgMix.apply(logits, cfg_scale, temperature)


# ----- ONNX side: the definitions as model-local functions -------------------------------------------
def _const(name: str, value, dtype=np.int64) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.array(value, dtype=dtype), name))


def selective_state_update_function(*, d_inner: int, conv_dim: int, nheads: int, headdim: int, d_state: int,
                                    ngroups: int, d_conv: int, opset: int) -> onnx.FunctionProto:
    """The op's body in standard ops (computed in float32, outputs cast back to the input/state types).

    Sizes are those of the model being exported (ONNX function bodies cannot compute reshape targets from
    attributes without much ceremony); `eps` is read from the node attribute.
    """
    f32 = TensorProto.FLOAT
    gs = ngroups * d_state
    n = []
    add = n.append
    # float32 views of the inputs
    for name in SELECTIVE_STATE_UPDATE_INPUTS:
        add(helper.make_node("Cast", [name], [f"{name}_f"], to=f32))
    # conv: shift the window left, append xbc, depthwise conv + bias, SiLU
    add(_const("c_one", [1]))
    add(_const("c_w", [d_conv]))
    add(_const("c_axis2", [2]))
    add(helper.make_node("Slice", ["conv_state_f", "c_one", "c_w", "c_axis2"], ["cs_tail"]))
    add(helper.make_node("Unsqueeze", ["xbc_f", "c_axis2"], ["xbc_col"]))
    add(helper.make_node("Concat", ["cs_tail", "xbc_col"], ["conv_new"], axis=2))
    add(_const("c_wshape", [conv_dim, d_conv]))
    add(helper.make_node("Reshape", ["conv_weight_f", "c_wshape"], ["w2"]))
    add(helper.make_node("Mul", ["conv_new", "w2"], ["cw"]))
    add(helper.make_node("ReduceSum", ["cw", "c_axis2"], ["csum"], keepdims=0))
    add(helper.make_node("Add", ["csum", "conv_bias_f"], ["cpre"]))
    add(helper.make_node("Sigmoid", ["cpre"], ["csig"]))
    add(helper.make_node("Mul", ["cpre", "csig"], ["act"]))
    add(_const("c_split", [d_inner, gs, gs]))
    add(helper.make_node("Split", ["act", "c_split"], ["xs", "Bs", "Cs"], axis=1))
    # heads: x (R, H, P); B and C (R, H, N), heads sharing their group's B and C
    add(_const("c_xshape", [0, nheads, headdim]))
    add(helper.make_node("Reshape", ["xs", "c_xshape"], ["x3"]))
    add(_const("c_gshape", [0, ngroups, 1, d_state]))
    add(_const("c_gexp", [1, 1, nheads // ngroups, 1]))
    add(_const("c_hshape", [0, nheads, d_state]))
    for m in ("B", "C"):
        add(helper.make_node("Reshape", [f"{m}s", "c_gshape"], [f"{m}g"]))
        add(helper.make_node("Expand", [f"{m}g", "c_gexp"], [f"{m}e"]))
        add(helper.make_node("Reshape", [f"{m}e", "c_hshape"], [f"{m}h"]))
    # dt, decay
    add(helper.make_node("Add", ["dt_f", "dt_bias_f"], ["dt_pre"]))
    add(helper.make_node("Softplus", ["dt_pre"], ["dts"]))
    add(helper.make_node("Exp", ["A_log_f"], ["negA"]))
    add(helper.make_node("Neg", ["negA"], ["A"]))
    add(helper.make_node("Mul", ["dts", "A"], ["dtA"]))
    add(helper.make_node("Exp", ["dtA"], ["dA"]))
    add(_const("c_axes23", [2, 3]))
    add(_const("c_axis3", [3]))
    add(helper.make_node("Unsqueeze", ["dA", "c_axes23"], ["dA4"]))
    # h = h * dA + (dt * x) outer B
    add(helper.make_node("Unsqueeze", ["dts", "c_axis2"], ["dts3"]))
    add(helper.make_node("Mul", ["dts3", "x3"], ["dtx"]))
    add(helper.make_node("Unsqueeze", ["dtx", "c_axis3"], ["dtx4"]))
    add(helper.make_node("Unsqueeze", ["Bh", "c_axis2"], ["B4"]))
    add(helper.make_node("Mul", ["dtx4", "B4"], ["dBx"]))
    add(helper.make_node("Mul", ["ssm_state_f", "dA4"], ["h_decay"]))
    add(helper.make_node("Add", ["h_decay", "dBx"], ["h"]))
    # y = h . C + D * x
    add(helper.make_node("Unsqueeze", ["Ch", "c_axis2"], ["C4"]))
    add(helper.make_node("Mul", ["h", "C4"], ["hC"]))
    add(helper.make_node("ReduceSum", ["hC", "c_axis3"], ["yh"], keepdims=0))
    add(_const("c_axis1", [1]))
    add(helper.make_node("Unsqueeze", ["D_f", "c_axis1"], ["D2"]))
    add(helper.make_node("Mul", ["D2", "x3"], ["Dx"]))
    add(helper.make_node("Add", ["yh", "Dx"], ["y3"]))
    add(_const("c_flat", [0, d_inner]))
    add(helper.make_node("Reshape", ["y3", "c_flat"], ["y2"]))
    # gated RMSNorm per group: rmsnorm(y * silu(z)) * w
    add(helper.make_node("Sigmoid", ["z_f"], ["zsig"]))
    add(helper.make_node("Mul", ["z_f", "zsig"], ["zsilu"]))
    add(helper.make_node("Mul", ["y2", "zsilu"], ["gated"]))
    add(_const("c_groups", [0, ngroups, d_inner // ngroups]))
    add(helper.make_node("Reshape", ["gated", "c_groups"], ["gg"]))
    add(helper.make_node("Mul", ["gg", "gg"], ["gsq"]))
    add(helper.make_node("ReduceMean", ["gsq", "c_axis2"], ["gms"], keepdims=1))
    eps_attr = helper.make_attribute_ref("value_float", onnx.AttributeProto.FLOAT)
    eps_attr.ref_attr_name = "eps"
    eps_node = helper.make_node("Constant", [], ["eps_v"])
    eps_node.attribute.append(eps_attr)
    add(eps_node)
    add(helper.make_node("Add", ["gms", "eps_v"], ["gvar"]))
    add(helper.make_node("Sqrt", ["gvar"], ["grms"]))
    add(helper.make_node("Div", ["gg", "grms"], ["gn"]))
    add(helper.make_node("Reshape", ["gn", "c_flat"], ["gnf"]))
    add(helper.make_node("Mul", ["gnf", "norm_weight_f"], ["y_f"]))
    # back to the input/state types
    add(helper.make_node("CastLike", ["y_f", "z"], ["y"]))
    add(helper.make_node("CastLike", ["conv_new", "conv_state"], ["conv_state_out"]))
    add(helper.make_node("CastLike", ["h", "ssm_state"], ["ssm_state_out"]))
    return helper.make_function(
        DOMAIN, "SelectiveStateUpdate", SELECTIVE_STATE_UPDATE_INPUTS, SELECTIVE_STATE_UPDATE_OUTPUTS, n,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["headdim", "d_state", "ngroups", "eps"],
        doc_string=__doc__.split("\n\n")[1],
    )


def cfg_mix_function(opset: int) -> onnx.FunctionProto:
    """CfgMix's body: cast to float32, split the rows into conditional and null halves, then ops.cfg_mix as the
    TorchScript exporter records it (so the ONNX definition cannot drift from the Python one)."""
    f32 = TensorProto.FLOAT
    prologue = [
        helper.make_node("Cast", ["logits"], ["logits_f"], to=f32),
        helper.make_node("Cast", ["cfg_scale"], ["scale_f"], to=f32),
        helper.make_node("Cast", ["temperature"], ["temperature_f"], to=f32),
        helper.make_node("Split", ["logits_f"], ["cond", "uncond"], axis=0, num_outputs=2),
    ]
    return helper.make_function(DOMAIN, "CfgMix", ["logits", "cfg_scale", "temperature"], ["mixed"],
                                prologue + _traced_cfg_mix_nodes(opset),
                                opset_imports=[helper.make_opsetid("", opset)], attributes=[])


class _CfgMixModule(torch.nn.Module):
    def forward(self, cond, uncond, scale_f, temperature_f):
        return ops.cfg_mix(cond, uncond, scale_f, temperature_f)


def _traced_cfg_mix_nodes(opset: int) -> list[onnx.NodeProto]:
    """ops.cfg_mix traced to ONNX nodes reading cond, uncond, scale_f, temperature_f and writing `mixed`."""
    buf = io.BytesIO()
    dyn = {0: "rows", 1: "vocab"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_CfgMixModule(), (torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor(1.0), torch.tensor(1.0)),
                          buf, dynamo=False, opset_version=opset, do_constant_folding=False,
                          input_names=["cond", "uncond", "scale_f", "temperature_f"], output_names=["mixed"],
                          dynamic_axes={"cond": dyn, "uncond": dyn, "mixed": dyn})
    graph = onnx.load_from_string(buf.getvalue()).graph
    if graph.initializer:  # a function body has no initializers: a traced constant would be lost
        raise AssertionError("ops.cfg_mix traced to a graph with initializers; build CfgMix's body differently")
    return list(graph.node)
