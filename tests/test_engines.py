"""The TensorRT path's parts that need no TensorRT: profiles, plan metadata checks, plugin fields, doctor.
What needs TensorRT itself skips with the reason."""

import importlib.util
import json

import numpy as np
import pytest

from aim_rt.engines.plan_meta import BatchRange, PlanMeta, check_plan, profile_shapes
from aim_rt.errors import AiMError
from aim_rt.plugins.trt_plugin import decode_fields, encode_fields

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_profile_shapes_follow_batch_and_rows():
    inputs = [{"name": "tokens", "shape": ["batch"]}, {"name": "position", "shape": []},
              {"name": "ssm_state", "shape": [24, "rows", 24, 64, 128]}, {"name": "final_mods", "shape": ["rows", 2, 768]}]
    shapes = profile_shapes(inputs, BatchRange(1, 8, 32))
    assert shapes["tokens"] == ((1,), (8,), (32,))
    assert shapes["ssm_state"] == ((24, 2, 24, 64, 128), (24, 16, 24, 64, 128), (24, 64, 24, 64, 128))
    assert shapes["final_mods"][2] == (64, 2, 768) and "position" not in shapes
    with pytest.raises(AiMError, match="unknown symbolic dimension"):
        profile_shapes([{"name": "x", "shape": ["seq"]}], BatchRange())
    with pytest.raises(AiMError, match="min <= opt <= max"):
        BatchRange(4, 2, 8)


def test_profile_shapes_from_a_real_export(tmp_path):
    import aim_rt
    from aim_rt.exporters.onnx_export import export_onnx
    from conftest import GOLDEN

    manifest = export_onnx(aim_rt.load_model(GOLDEN / "stage2_group.safetensors"), tmp_path)
    shapes = profile_shapes(manifest["graphs"]["custom/step"]["inputs"], BatchRange(2, 4, 6))
    assert shapes["conv_state"] == ((4, 4, 512, 4), (4, 8, 512, 4), (4, 12, 512, 4))
    assert set(shapes) == {"tokens", "conv_state", "ssm_state", "mods", "final_mods"}


def _meta(**kw):
    base = dict(graph="custom/step", onnx_file="custom/step.onnx", tensorrt_flavour="tensorrt", tensorrt_version="10.9.0",
                gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0", precision="bfloat16",
                batch={"min": 1, "opt": 16, "max": 64}, model_sha256="ab" * 32, export_manifest={"opset": 18},
                aim_rt_version="0.1.0")
    base.update(kw)
    return PlanMeta(**base)


def test_plan_metadata_round_trip_and_checks(tmp_path):
    plan = tmp_path / "custom_step.plan"
    plan.write_bytes(b"plan")
    _meta().write(plan)
    meta = PlanMeta.read(plan)
    assert meta == _meta()
    ok = dict(flavour="tensorrt", version="10.9.0", gpu_name="NVIDIA A100-PCIE-40GB", compute_capability="8.0",
              rebuild="aim-rt export M --format trt --out D")
    check_plan(meta, **ok)  # same TensorRT, same compute capability: fine
    with pytest.raises(AiMError, match=r"built with tensorrt 10\.9\.0, this machine has tensorrt 10\.13.*Rebuild: aim-rt export"):
        check_plan(meta, **{**ok, "version": "10.13.0"})
    with pytest.raises(AiMError, match=r"compute capability 8\.0 .* this GPU is 9\.0"):
        check_plan(meta, **{**ok, "compute_capability": "9.0"})
    (tmp_path / "other.plan").write_bytes(b"x")
    with pytest.raises(AiMError, match="no other.plan.meta.json"):
        PlanMeta.read(tmp_path / "other.plan")
    (tmp_path / "bad.plan.meta.json").write_text(json.dumps({"graph": "x"}))
    with pytest.raises(AiMError, match="unreadable"):
        PlanMeta.read(tmp_path / "bad.plan")


def test_plugin_fields_round_trip():
    attrs = {"headdim": 64, "d_state": 128, "ngroups": 1, "eps": 1e-5}
    fields = encode_fields(attrs)
    assert fields["headdim"].dtype == np.int32 and fields["eps"].dtype == np.float32
    back = decode_fields(fields)
    assert back["headdim"] == 64 and back["ngroups"] == 1 and abs(back["eps"] - 1e-5) < 1e-12
    with pytest.raises(ValueError, match="needs attributes"):
        encode_fields({"headdim": 64})
    with pytest.raises(ValueError, match="must be one int32"):
        decode_fields({**fields, "d_state": np.array([128], dtype=np.int64)})


def test_plugin_fields_match_the_exported_node(tmp_path):
    import onnx

    import aim_rt
    from aim_rt.exporters.onnx_export import export_onnx
    from conftest import GOLDEN

    export_onnx(aim_rt.load_model(GOLDEN / "stage2_single.safetensors"), tmp_path)
    node = next(n for n in onnx.load(str(tmp_path / "custom/step.onnx")).graph.node if n.op_type == "SelectiveStateUpdate")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert decode_fields(encode_fields(attrs)) == pytest.approx(attrs)


def test_doctor_reports_backends():
    from typer.testing import CliRunner

    from aim_rt.cli import app
    from aim_rt.doctor import report

    info = report()
    assert set(info["backends"]) == {"torch", "onnxruntime", "cuda", "tensorrt"}
    assert info["backends"]["torch"].startswith("yes")
    if not HAS_TRT:
        assert info["backends"]["tensorrt"].startswith(("no", "build only"))
    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == 0 and "backend" in res.output


def test_tensorrt_backend_without_tensorrt_is_a_clear_error(tmp_path):
    import aim_rt
    from aim_rt.backends import make_backend
    from aim_rt.engines.trt import find_tensorrt

    if find_tensorrt() is not None:
        pytest.skip("TensorRT is installed here")
    model = aim_rt.random_model(aim_rt.AiMConfig(d_model=64, n_layer=1, vocab_size=64, num_classes=5, num_tokens=16,
                                                 d_state=32, headdim=32))
    with pytest.raises(AiMError, match="TensorRT is not installed"):
        make_backend("tensorrt", model, artifacts=tmp_path)


@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed on this machine")
def test_build_engines_with_tensorrt(tmp_path):
    import torch

    import aim_rt
    from aim_rt.engines.builder import build_engines
    from aim_rt.exporters.onnx_export import export_onnx
    from conftest import GOLDEN

    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA GPU is visible")
    export_onnx(aim_rt.load_model(GOLDEN / "stage2_group.safetensors"), tmp_path)
    results = {r.graph: r for r in build_engines(tmp_path)}
    assert results["portable/step"].ok and results["portable/prefill"].ok


def test_plugin_builds_kernels_once_per_dtype_and_device(monkeypatch):
    """Building Kernels loads a CUDA module: an enqueue must reuse them (a setdefault(key, Kernels(...)) did not)."""
    import aim_rt.plugins.kernels as kernels
    from aim_rt.plugins import trt_plugin

    built = []

    class FakeKernels:
        def __init__(self, dtype, device_index=0):
            built.append((dtype, device_index))

    monkeypatch.setattr(kernels, "Kernels", FakeKernels)
    monkeypatch.setattr(trt_plugin, "_kernels", {})
    first = trt_plugin.kernels_for("bfloat16", 0)
    assert trt_plugin.kernels_for("bfloat16", 0) is first and built == [("bfloat16", 0)]
    trt_plugin.kernels_for("float32", 0)
    trt_plugin.kernels_for("bfloat16", 1)
    trt_plugin.kernels_for("float32", 0)
    assert built == [("bfloat16", 0), ("float32", 0), ("bfloat16", 1)]


def test_runner_captures_one_graph_per_key_and_reuses_it():
    """sample() must replay the graph it captured for this batch and these baked-in settings, not capture anew."""
    from aim_rt.engines.runner import GraphCache, TensorRTBackend, graph_key
    from aim_rt.sampling import SamplingSettings

    captured = []
    backend = object.__new__(TensorRTBackend)  # no TensorRT here: only the cache logic
    backend._graphs = GraphCache(lambda key: captured.append(key) or {"key": key})
    base = SamplingSettings(cfg_scale=5.0, top_k=600, top_p=0.98)
    ws = backend._workspace(4, base)
    # cfg_scale, temperature (device scalars) and the seeds (a buffer) do not need a new graph
    assert backend._workspace(4, SamplingSettings(cfg_scale=2.0, top_k=600, top_p=0.98, temperature=0.5)) is ws
    assert captured == [graph_key(4, base)]
    # what the sampling kernel takes by value, and the batch, do
    backend._workspace(4, SamplingSettings(cfg_scale=5.0, top_k=100, top_p=0.98))
    backend._workspace(4, SamplingSettings(cfg_scale=5.0, top_k=600, top_p=0.9))
    backend._workspace(4, SamplingSettings(cfg_scale=5.0, top_k=600, top_p=0.98, position_convention="training"))
    backend._workspace(8, base)
    assert len(captured) == len(set(captured)) == 5 == len(backend._graphs)
    assert backend._workspace(8, base)["key"] == graph_key(8, base) and len(captured) == 5


def test_plugin_enqueues_do_all_torch_work_on_tensorrts_stream():
    """Without TensorRT the impls cannot run; their shape is checked instead: the whole body of each enqueue is
    one `with torch.cuda.stream(torch.cuda.ExternalStream(stream))` block."""
    import ast
    import inspect

    from aim_rt.plugins import trt_plugin

    tree = ast.parse(inspect.getsource(trt_plugin.register))
    impls = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
             and any(isinstance(d, ast.Call) and ast.unparse(d.func) == "trtp.impl" for d in f.decorator_list)]
    assert len(impls) == 2
    for fn in impls:
        assert len(fn.body) == 1 and isinstance(fn.body[0], ast.With), fn.name
        assert ast.unparse(fn.body[0].items[0].context_expr) == "torch.cuda.stream(torch.cuda.ExternalStream(stream))"
