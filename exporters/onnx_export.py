"""Export a loaded AiM to ONNX: prefill and step graphs (custom-op and portable variants), the VQ decoder,
and a manifest that says what was exported from what, with which tools.

Layout of an export directory:
    manifest.json
    custom/prefill.onnx, custom/step.onnx      aim_rt.SelectiveStateUpdate per layer + aim_rt.CfgMix nodes
                                               (each with its ONNX function definition)
    portable/prefill.onnx, portable/step.onnx  standard ONNX ops only
    vq_decoder.onnx                            tokens → images (float in [-1, 1], or uint8 NHWC)
Large graphs keep their weights in one external `NAME.onnx.data` file beside them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import platform
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from aim_rt import __version__
from aim_rt.errors import AiMError, OutputError
from aim_rt.joblock import LOCK_NAME, JobLock
from aim_rt.loading import dtype_name, resolve_dtype
from aim_rt.model import AiM
from aim_rt.outputs import atomic_write_json

from .custom_ops import DOMAIN, VERSION, cfg_mix_function, cfg_mix_tensor_op, selective_state_update_function, \
    selective_state_update_op
from .graphs import PrefillGraph, StepGraph, VQDecoderGraph

MANIFEST = "manifest.json"
FORMAT = "aim-rt-onnx/1"
OPSETS = range(18, 22)  # Split(num_outputs) needs 18; TensorRT 10 parses up to 21-22
EXTERNAL_DATA_BYTES = 256 << 20
# Every file an export writes (graphs, their external data, the manifest): --overwrite removes these, nothing else.
GRAPH_FILES = ("custom/prefill.onnx", "custom/step.onnx", "portable/prefill.onnx", "portable/step.onnx",
               "vq_decoder.onnx")
EXPORT_FILES = (*GRAPH_FILES, *(f"{g}.data" for g in GRAPH_FILES), MANIFEST)


def _is_export(out: Path) -> bool:
    try:
        return json.loads((out / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_export_dir(out: str | Path, overwrite: bool = False) -> None:
    """An export goes into a new or empty directory, or an earlier aim-rt export (whose files it replaces); a
    directory holding anything else needs `overwrite`, and even then its other files are left alone."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; pass a directory")
    if not out.is_dir() or overwrite or _is_export(out):
        return
    foreign = [p for p in out.iterdir() if p.name != LOCK_NAME]
    if foreign:
        raise OutputError(f"--out {out} is not empty and is not an aim-rt export (it holds {foreign[0].name}); pass an "
                          "empty or new directory, or --overwrite to export beside its files (none is deleted)")


def _remove_previous_export(out: Path) -> None:
    """The manifest goes first: a kill midway leaves no manifest describing graphs that are gone."""
    (out / MANIFEST).unlink(missing_ok=True)
    for name in EXPORT_FILES:
        (out / name).unlink(missing_ok=True)


def _export_one(module: torch.nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes,
                functions: list[onnx.FunctionProto], opset: int) -> onnx.ModelProto:
    """Trace `module` to `path`; add the custom ops' function definitions; save (external data when large)."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # the TorchScript exporter (present in torch 2.11-2.13) is what records autograd.Function symbolics
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "graph.onnx"
        torch.onnx.export(module, args, str(raw), dynamo=False, opset_version=opset, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True,
                          custom_opsets={DOMAIN: VERSION} if functions else None)
        model = onnx.load(str(raw))
    if functions:
        model.functions.extend(functions)
    model.producer_name, model.producer_version = "aim-rt", __version__
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    large = model.ByteSize() > EXTERNAL_DATA_BYTES if model.ByteSize() >= 0 else True
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    # full_check runs strict shape inference, through the custom ops' function bodies too
    onnx.checker.check_model(str(path), full_check=True)
    return model


def _io(model: onnx.ModelProto) -> dict:
    def desc(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
        return out

    return {"inputs": desc(model.graph.input), "outputs": desc(model.graph.output)}


def export_onnx(model: AiM, out_dir: str | Path, *, dtype: str | torch.dtype = "float32", opset: int = 18,
                prefix_len: int = 0, vq_uint8: bool = False, model_sha256: str | None = None,
                source: str | None = None, overwrite: bool = False, lock: bool = True) -> dict:
    """Write every graph for `model` into `out_dir` and return the manifest. `model` itself is left as it was
    (the export works on a CPU copy in the export dtype). With bfloat16 the VQ decoder graph stays float32:
    ONNX convolutions take no bfloat16."""
    if opset not in OPSETS:
        raise AiMError(f"unsupported ONNX opset {opset}: aim-rt exports opsets {OPSETS.start}..{OPSETS.stop - 1}")
    try:
        dt = resolve_dtype(dtype)
    except AiMError as e:
        raise AiMError(f"cannot export: {e}") from None
    if not 0 <= prefix_len < model.config.num_tokens:
        raise AiMError(f"prefix length (--prefix-len) must lie in [0, {model.config.num_tokens}), got {prefix_len}")
    out = Path(out_dir)
    check_export_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    with JobLock(out) if lock else contextlib.nullcontext():
        check_export_dir(out, overwrite)  # again, under the lock
        _remove_previous_export(out)
        return _export_all(_export_copy(model, dt), out, dt, opset, prefix_len, vq_uint8, model_sha256,
                           source if source is not None else getattr(model, "source", None))


def _export_copy(model: AiM, dt: torch.dtype) -> AiM:
    """A CPU copy in `dt` (the caller's model is not converted in place); its VQ stays float32 for bfloat16."""
    vq = model.vq
    model.vq = None  # copied separately, so that it is converted once and only as needed
    try:
        copy_ = copy.deepcopy(model).to("cpu", dt).eval()
    finally:
        model.vq = vq
    if vq is not None:
        vq_dtype = torch.float32 if dt == torch.bfloat16 else dt
        copy_.vq = copy.deepcopy(vq).to("cpu", vq_dtype).eval()
    return copy_


def _export_all(model: AiM, out: Path, dt: torch.dtype, opset: int, prefix_len: int, vq_uint8: bool,
                model_sha256: str | None, source: str | None) -> dict:
    cfg = model.config
    batch = 2
    classes = torch.arange(batch) % cfg.num_classes
    scal = torch.tensor(5.0), torch.tensor(1.0)
    prefill_args = (classes, *scal)
    prefill_in = ["classes", "cfg_scale", "temperature"]
    if prefix_len:
        prefill_args += (torch.zeros(batch, prefix_len, dtype=torch.long), torch.tensor(1))
        prefill_in += ["prefix", "position_offset"]
    prefill_out = ["logits", "conv_state", "ssm_state", "mods", "final_mods"]
    b, r = {0: "batch"}, {1: "rows"}
    prefill_axes = {"classes": b, "prefix": b, "logits": b, "conv_state": r, "ssm_state": r, "mods": r,
                    "final_mods": {0: "rows"}}
    with torch.no_grad():
        _, conv, ssm, mods, fmods = PrefillGraph(model).forward(classes, *scal)
    step_args = (classes, torch.tensor(3), conv, ssm, mods, fmods, *scal)
    step_in = ["tokens", "position", "conv_state", "ssm_state", "mods", "final_mods", "cfg_scale", "temperature"]
    step_out = ["logits", "conv_state_out", "ssm_state_out"]
    step_axes = {"tokens": b, "conv_state": r, "ssm_state": r, "mods": r, "final_mods": {0: "rows"}, "logits": b,
                 "conv_state_out": r, "ssm_state_out": r}
    functions = [
        selective_state_update_function(d_inner=cfg.d_inner, conv_dim=cfg.conv_dim, nheads=cfg.nheads,
                                        headdim=cfg.headdim, d_state=cfg.d_state, ngroups=cfg.ngroups,
                                        d_conv=cfg.d_conv, opset=opset),
        cfg_mix_function(opset),
    ]

    graphs = {}
    for variant, ssm_op, cfg_op, funcs in (
        ("custom", selective_state_update_op, cfg_mix_tensor_op, functions),
        ("portable", None, None, []),
    ):
        pre = PrefillGraph(model, prefix_len, cfg_op)
        m = _export_one(pre, prefill_args, out / variant / "prefill.onnx", prefill_in, prefill_out, prefill_axes,
                        [functions[1]] if funcs else [], opset)
        graphs[f"{variant}/prefill"] = {"file": f"{variant}/prefill.onnx", **_io(m)}
        step = StepGraph(model, ssm_op, cfg_op) if ssm_op else StepGraph(model)
        m = _export_one(step, step_args, out / variant / "step.onnx", step_in, step_out, step_axes, funcs, opset)
        graphs[f"{variant}/step"] = {"file": f"{variant}/step.onnx", **_io(m)}
    if model.vq is not None:
        graphs["vq_decoder"] = export_vq_decoder(model.vq, cfg.num_tokens, out / "vq_decoder.onnx", opset=opset,
                                                 uint8=vq_uint8)
        graphs["vq_decoder"]["file"] = "vq_decoder.onnx"

    manifest = {
        "format": FORMAT,
        "model_sha256": model_sha256,
        "model_source": source,
        "config": cfg.to_official(),
        "vq_config": model.vq.config.to_official() if model.vq is not None else None,
        "sampling_defaults": getattr(model, "sampling_defaults", {}),
        "opset": opset,
        "dtype": dtype_name(dt),
        "vq_dtype": dtype_name(model.vq.dtype) if model.vq is not None else None,
        "prefix_len": prefix_len,
        "vq_uint8": vq_uint8,
        "semantics": {
            "rows": "conditional rows then null-class rows (class id num_classes)",
            "null_class": cfg.null_class,
            "position": "step input `position`; the official sampler feeds token k at k + 1 (training: k)",
            "cfg": "mixed = (u + (c - u) * cfg_scale) / temperature, float32",
            "custom_ops": {"domain": DOMAIN, "version": VERSION, "ops": ["SelectiveStateUpdate", "CfgMix"]},
        },
        "graphs": graphs,
        "tools": _tool_versions(),
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def export_vq_decoder(vq, num_tokens: int, path: str | Path, *, opset: int = 18, uint8: bool = False) -> dict:
    """tokens[batch, num_tokens] → images[batch, 3, H, W] (float, in the VQ's dtype) or [batch, H, W, 3] uint8."""
    graph = VQDecoderGraph(vq.eval(), num_tokens, uint8)
    dyn = {0: "batch"}
    m = _export_one(graph, (torch.zeros(2, num_tokens, dtype=torch.long, device=vq.device),), Path(path),
                    ["tokens"], ["images"], {"tokens": dyn, "images": dyn}, [], opset)
    return {"file": str(path), **_io(m)}


def _tool_versions() -> dict:
    versions = {"aim_rt": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                "python": platform.python_version()}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return versions


def read_manifest(export_dir: str | Path) -> dict:
    path = Path(export_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise AiMError(f"{export_dir} is not an aim-rt export (no {MANIFEST}); create it with `aim-rt export`") from None
    except (OSError, ValueError) as e:
        raise AiMError(f"cannot read {path}: {e}") from None
    if manifest.get("format") != FORMAT:
        raise AiMError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}; re-export with this aim-rt")
    return manifest
