"""Exported graphs, executed by ONNX Runtime on CPU, against the reference (fp32: ≤ 1e-4 relative)."""

import json

import numpy as np
import onnx
import pytest
import torch

import aim_rt
from aim_rt.errors import AiMError
from aim_rt.exporters.graphs import PrefillGraph, StepGraph
from aim_rt.exporters.onnx_export import export_onnx, export_vq_decoder
from aim_rt.ort_backend import OnnxRuntimeBackend
from aim_rt.decoding import sample_tokens
from aim_rt.sampling import SamplingSettings
from conftest import GOLDEN, STAGE2_GOLDENS, golden, rel_err

ort = pytest.importorskip("onnxruntime")
TOL = 1e-4
VARIANTS = ["custom", "portable"]


def _session(export_dir, name):
    return ort.InferenceSession(str(export_dir / name), providers=["CPUExecutionProvider"])


def check_graphs_against_reference(model, export_dir, variant, steps=4, batch=3, seed=0):
    """Prefill then `steps` decode steps through ORT and through the reference; every output compared."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    scale, temp = torch.tensor(2.5), torch.tensor(0.8)
    prefill, step = _session(export_dir, f"{variant}/prefill.onnx"), _session(export_dir, f"{variant}/step.onnx")
    with torch.no_grad():
        ref = PrefillGraph(model)(classes, scale, temp)
    got = prefill.run(None, {"classes": classes.numpy(), "cfg_scale": scale.numpy(), "temperature": temp.numpy()})
    errors = {}
    for name, r, o in zip(["logits", "conv_state", "ssm_state", "mods", "final_mods"], ref, got):
        errors[f"prefill.{name}"] = rel_err(torch.from_numpy(o), r)
    _, conv, ssm, mods, fmods = ref
    ort_conv, ort_ssm = got[1], got[2]
    for k in range(steps):
        tokens = torch.randint(0, cfg.vocab_size, (batch,), generator=g)
        pos = torch.tensor(k + 1)
        with torch.no_grad():
            logits, conv, ssm = StepGraph(model)(tokens, pos, conv, ssm, mods, fmods, scale, temp)
        o_logits, ort_conv, ort_ssm = step.run(None, {
            "tokens": tokens.numpy(), "position": pos.numpy(), "conv_state": ort_conv, "ssm_state": ort_ssm,
            "mods": got[3], "final_mods": got[4], "cfg_scale": scale.numpy(), "temperature": temp.numpy()})
        for name, r, o in (("logits", logits, o_logits), ("conv_state", conv, ort_conv), ("ssm_state", ssm, ort_ssm)):
            key = f"step.{name}"
            errors[key] = max(errors.get(key, 0.0), rel_err(torch.from_numpy(o), r))
    return errors


@pytest.fixture(scope="module", params=STAGE2_GOLDENS)
def golden_export(request, tmp_path_factory):
    model = aim_rt.load_model(GOLDEN / f"{request.param}.safetensors")
    out = tmp_path_factory.mktemp(request.param)
    export_onnx(model, out)
    return request.param, model, out


@pytest.mark.parametrize("variant", VARIANTS)
def test_golden_graphs_match_reference(golden_export, variant):
    name, model, out = golden_export
    errors = check_graphs_against_reference(model, out, variant)
    print(name, variant, json.dumps({k: f"{v:.2e}" for k, v in errors.items()}))
    assert max(errors.values()) <= TOL, errors


def test_graph_structure(golden_export):
    name, model, out = golden_export
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"] == model.config.to_official() and manifest["opset"] == 18
    custom = onnx.load(str(out / "custom/step.onnx"))
    onnx.checker.check_model(custom, full_check=True)
    kinds = [n.op_type for n in custom.graph.node if n.domain == "aim_rt"]
    assert kinds.count("SelectiveStateUpdate") == model.config.n_layer and kinds.count("CfgMix") == 1
    ssu = next(n for n in custom.graph.node if n.op_type == "SelectiveStateUpdate")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in ssu.attribute}
    assert attrs["headdim"] == model.config.headdim and attrs["d_state"] == model.config.d_state
    assert attrs["ngroups"] == 1 and abs(attrs["eps"] - 1e-5) < 1e-12
    assert {f.name for f in custom.functions} == {"SelectiveStateUpdate", "CfgMix"}
    portable = onnx.load(str(out / "portable/step.onnx"))
    assert {n.domain for n in portable.graph.node} <= {"", "ai.onnx"} and not portable.functions


@pytest.mark.parametrize("variant", VARIANTS)
def test_onnxruntime_backend_tokens_equal_torch_backend(golden_export, variant):
    name, model, out = golden_export
    settings = SamplingSettings(cfg_scale=3.0, top_k=50, top_p=0.95, temperature=1.1)
    classes, seeds = [0, 5, 6, 1], [10, 11, 12, 13]
    ours = OnnxRuntimeBackend(out, variant).sample(classes, seeds, settings)
    assert torch.equal(ours, sample_tokens(model, classes, seeds, settings))


def test_aim_b_shaped_random_model(tmp_path):
    """The real AiM-B shapes (24 layers, d 768, vocab 16384): both variants, prefill and 3 steps."""
    model = aim_rt.random_model("AiM-B", seed=0)
    export_onnx(model, tmp_path)
    for variant in VARIANTS:
        errors = check_graphs_against_reference(model, tmp_path, variant, steps=3, batch=2)
        print("AiM-B", variant, json.dumps({k: f"{v:.2e}" for k, v in errors.items()}))
        assert max(errors.values()) <= TOL, (variant, errors)


def test_prefix_prefill_graph(tmp_path):
    model = aim_rt.load_model(GOLDEN / "stage2_single.safetensors")
    export_onnx(model, tmp_path, prefix_len=5)
    settings = SamplingSettings(cfg_scale=1.75, top_k=20, top_p=0.9)
    full = sample_tokens(model, [1, 4], [3, 4], settings)
    backend = OnnxRuntimeBackend(tmp_path)
    assert torch.equal(backend.sample([1, 4], [3, 4], settings, prefix=full[:, :5]), full)
    with pytest.raises(AiMError, match="prefix of 5 tokens"):
        backend.sample([1, 4], [3, 4], settings)


@pytest.mark.parametrize("uint8", [False, True])
def test_vq_graph_matches_golden_images(tmp_path, uint8):
    g, _ = golden("vq_small")
    vq = aim_rt.load_vq(GOLDEN / "vq_small.safetensors")
    export_vq_decoder(vq, 16, tmp_path / "vq.onnx", uint8=uint8)
    images = _session(tmp_path, "vq.onnx").run(None, {"tokens": g["golden.indices"].numpy()})[0]
    if uint8:
        expected = aim_rt.vq.to_uint8(g["golden.images"]).numpy()
        assert images.dtype == np.uint8 and np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    else:
        assert rel_err(torch.from_numpy(images), g["golden.images"]) <= TOL


def test_cli_generate_with_onnxruntime_equals_torch(tiny_ckpt, tmp_path):
    from typer.testing import CliRunner

    from aim_rt.cli import app

    runner = CliRunner()
    args = [str(tiny_ckpt), "-c", "0-4", "-n", "2", "--seed", "5"]
    assert runner.invoke(app, ["generate", *args, "-o", str(tmp_path / "t")]).exit_code == 0
    res = runner.invoke(app, ["generate", *args, "-o", str(tmp_path / "o"), "--backend", "onnxruntime",
                              "--engines", str(tmp_path / "engines")])
    assert res.exit_code == 0, res.output
    a, b = np.load(tmp_path / "t/tokens.npz")["tokens"], np.load(tmp_path / "o/tokens.npz")["tokens"]
    assert np.array_equal(a, b)
    ia, ib = np.load(tmp_path / "t/samples.npz")["arr_0"], np.load(tmp_path / "o/samples.npz")["arr_0"]
    assert np.abs(ia.astype(int) - ib.astype(int)).max() <= 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_exports_pass_the_checker(tmp_path, dtype):
    model = aim_rt.load_model(GOLDEN / "stage2_group.safetensors")
    manifest = export_onnx(model, tmp_path, dtype=dtype)
    assert manifest["dtype"] == dtype
    step = onnx.load(str(tmp_path / "custom/step.onnx"))
    onnx.checker.check_model(step, full_check=True)
    want = onnx.TensorProto.FLOAT16 if dtype == "float16" else onnx.TensorProto.BFLOAT16
    assert {i.name: i.type.tensor_type.elem_type for i in step.graph.input}["ssm_state"] == want


def test_export_errors(tmp_path):
    model = aim_rt.load_model(GOLDEN / "stage2_group.safetensors")
    with pytest.raises(AiMError, match="opset 13"):
        export_onnx(model, tmp_path, opset=13)
    with pytest.raises(AiMError, match="unsupported dtype"):
        export_onnx(model, tmp_path, dtype="int8")
    with pytest.raises(AiMError, match="not an aim-rt export"):
        OnnxRuntimeBackend(tmp_path / "nothing")


@pytest.mark.parametrize("variant", VARIANTS)
def test_onnxruntime_teacher_forcing_gives_the_reference_mixed_logits(golden_export, variant):
    """The one loop over the exported graphs: teacher-forced mixed logits against the reference's."""
    from aim_rt.backends import TorchBackend

    name, model, out = golden_export
    settings = SamplingSettings(cfg_scale=2.5, top_k=30, top_p=0.95, temperature=0.9)
    classes, seeds = [3, 6], [1, 2]
    teacher = sample_tokens(model, classes, [9, 9], settings)
    ours, mixed = OnnxRuntimeBackend(out, variant).sample(classes, seeds, settings, teacher=teacher, return_mixed=True)
    ref, ref_mixed = TorchBackend(model).sample(classes, seeds, settings, teacher=teacher, return_mixed=True)
    assert mixed.shape == ref_mixed.shape == (2, model.config.num_tokens, model.config.vocab_size)
    assert rel_err(mixed, ref_mixed) <= TOL
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cfg_mix_onnx_function_is_ops_cfg_mix(dtype):
    """The CfgMix function body, run by ONNX Runtime, against ops.cfg_mix (its source)."""
    from onnx import TensorProto, helper

    from aim_rt import ops
    from aim_rt.exporters.custom_ops import DOMAIN, VERSION, cfg_mix_function

    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    graph = helper.make_graph(
        [helper.make_node("CfgMix", ["logits", "cfg_scale", "temperature"], ["mixed"], domain=DOMAIN)], "cfg",
        [helper.make_tensor_value_info("logits", elem, ["rows", "vocab"]),
         helper.make_tensor_value_info("cfg_scale", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("temperature", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("mixed", TensorProto.FLOAT, ["batch", "vocab"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, VERSION)],
                              functions=[cfg_mix_function(18)])
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = np.random.default_rng(0).standard_normal((6, 37)).astype(dtype)
    got = session.run(None, {"logits": logits, "cfg_scale": np.array(3.5, np.float32),
                             "temperature": np.array(0.7, np.float32)})[0]
    t = torch.from_numpy(logits)
    want = ops.cfg_mix(t[:3], t[3:], torch.tensor(3.5), torch.tensor(0.7))
    assert got.dtype == np.float32 and np.array_equal(got, want.numpy())


def test_artifacts_of_other_or_unknown_weights_are_refused(tmp_path):
    from aim_rt.backends import make_backend

    model = aim_rt.load_model(GOLDEN / "stage2_single.safetensors")
    ours, other = "ab" * 32, "cd" * 32
    export_onnx(model, tmp_path / "ours", model_sha256=ours)
    export_onnx(model, tmp_path / "unknown")
    assert make_backend("onnxruntime", model, artifacts=tmp_path / "ours", model_sha256=ours).name == "onnxruntime"
    with pytest.raises(AiMError, match=r"exported from other weights \(sha256 abababababab.*aim-rt export .* --out"):
        make_backend("onnxruntime", model, artifacts=tmp_path / "ours", model_sha256=other)
    with pytest.raises(AiMError, match="records no model hash.*aim-rt export"):
        make_backend("onnxruntime", model, artifacts=tmp_path / "unknown", model_sha256=ours)
    # no hash known (a model made in memory): the artifacts are taken as they are
    assert make_backend("onnxruntime", model, artifacts=tmp_path / "unknown").name == "onnxruntime"
    with pytest.raises(TypeError):
        make_backend("onnxruntime", model, engines=tmp_path / "ours")  # the old name is gone
