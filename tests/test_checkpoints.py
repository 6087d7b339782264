"""Every checkpoint form users have, and every way a checkpoint can be wrong: a clear error naming the problem."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import aim_rt
from aim_rt import CheckpointError
from conftest import GOLDEN, golden, rel_err


def test_directory_with_hub_layout_loads_stage2_and_vq(tiny_ckpt):
    keys = load_file(str(tiny_ckpt / "model.safetensors")).keys()
    assert all(k.startswith(("mamba.", "vqvae.")) for k in keys)
    model = aim_rt.load_model(tiny_ckpt)
    assert model.vq is not None and model.sampling_defaults["cfg_scale"] == 2.0
    images = model.decode_tokens(torch.zeros(2, 16, dtype=torch.long))
    assert images.shape == (2, 3, 8, 8)


def test_stage2_only_bin_without_prefix(tmp_path):
    """MambaLMHeadModel.save_pretrained: pytorch_model.bin (pickle) + config.json, keys without `mamba.`."""
    g, meta = golden("stage2_group")
    torch.save({k: v for k, v in g.items() if not k.startswith("golden.")}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(meta["config"]))
    model = aim_rt.load_model(tmp_path)
    got = model.teacher_logits(g["golden.classes"], g["golden.tokens"])
    assert rel_err(got, g["golden.logits_teacher"]) <= 1e-4


def test_llamagen_vq_pt_with_model_key(tmp_path):
    g, meta = golden("vq_small")
    torch.save({"model": {k: v for k, v in g.items() if not k.startswith("golden.")}}, tmp_path / "vq.pt")
    vq = aim_rt.load_vq(tmp_path / "vq.pt", config=meta)
    assert rel_err(vq.decode_tokens(g["golden.indices"]), g["golden.images"]) <= 1e-4


def test_single_file_with_explicit_config(tmp_path):
    shutil.copy(GOLDEN / "stage2_single.safetensors", tmp_path / "weights.safetensors")
    with pytest.raises(CheckpointError, match="no stage-2 config"):
        aim_rt.load_model(tmp_path / "weights.safetensors")
    model = aim_rt.load_model(tmp_path / "weights.safetensors", config=GOLDEN / "stage2_single.json")
    assert model.config.n_layer == 3


class NotTensors:  # an arbitrary object: unpickling it would run code from this module
    pass


def test_pickled_code_is_refused(tmp_path):
    torch.save({"model": NotTensors()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        aim_rt.load_vq(tmp_path / "evil.pt")


def test_truncated_safetensors(tmp_path):
    data = (GOLDEN / "stage2_single.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copy(GOLDEN / "stage2_single.json", tmp_path / "model.json")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        aim_rt.load_model(tmp_path / "model.safetensors")


def _rewrite(tmp_path, edit):
    g = load_file(str(GOLDEN / "stage2_single.safetensors"))
    edit(g)
    save_file(g, str(tmp_path / "m.safetensors"))
    shutil.copy(GOLDEN / "stage2_single.json", tmp_path / "m.json")
    return tmp_path / "m.safetensors"


def test_wrong_shape_names_the_key(tmp_path):
    def edit(g):
        g["backbone.layers.1.mixer.in_proj.weight"] = torch.zeros(770, 128)

    with pytest.raises(CheckpointError, match=r"backbone\.layers\.1\.mixer\.in_proj\.weight.*\(770, 128\).*\(772, 128\)"):
        aim_rt.load_model(_rewrite(tmp_path, edit))


def test_unknown_key_is_named(tmp_path):
    def edit(g):
        g["backbone.layers.0.mixer.extra"] = torch.zeros(3)

    with pytest.raises(CheckpointError, match=r"unexpected key 'backbone\.layers\.0\.mixer\.extra'"):
        aim_rt.load_model(_rewrite(tmp_path, edit))


def test_foreign_key_is_named(tmp_path):
    def edit(g):
        g["transformer.h.0.weight"] = torch.zeros(3)

    with pytest.raises(CheckpointError, match=r"unknown key 'transformer\.h\.0\.weight'"):
        aim_rt.load_model(_rewrite(tmp_path, edit))


def test_missing_key_is_named(tmp_path):
    def edit(g):
        del g["backbone.layers.2.mixer.A_log"]

    with pytest.raises(CheckpointError, match=r"missing key 'backbone\.layers\.2\.mixer\.A_log'"):
        aim_rt.load_model(_rewrite(tmp_path, edit))


def test_nan_weights_are_refused(tmp_path):
    def edit(g):
        g["backbone.norm_f.weight"][3] = float("nan")

    with pytest.raises(CheckpointError, match="norm_f.weight.*NaN"):
        aim_rt.load_model(_rewrite(tmp_path, edit))


def test_untied_head_that_differs_is_refused(tmp_path):
    def edit(g):
        g["lm_head.weight"] = g["lm_head.weight"] + 1

    with pytest.raises(CheckpointError, match="tie_embeddings"):
        aim_rt.load_model(_rewrite(tmp_path, edit))


def test_missing_file():
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        aim_rt.load_model("/nonexistent/dir/model.safetensors")


def test_hub_id_offline_gives_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"could not fetch 'hp-l33/aim-base'.*offline"):
        aim_rt.load_model("AiM-B")


def test_vq_codebook_must_match_vocabulary():
    model = aim_rt.load_model(GOLDEN / "stage2_group.safetensors")  # vocab 512
    vq = aim_rt.load_vq(GOLDEN / "vq_small.safetensors")  # 64 codes
    with pytest.raises(CheckpointError, match="64 entries.*512"):
        aim_rt.loading.attach_vq(model, vq)


def test_bad_config_field(tmp_path):
    shutil.copy(GOLDEN / "stage2_single.safetensors", tmp_path / "m.safetensors")
    meta = json.loads((GOLDEN / "stage2_single.json").read_text())
    meta["config"]["ssm_cfg"] = {"layer": "Mamba1"}
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="Mamba2"):
        aim_rt.load_model(tmp_path / "m.safetensors")


def test_dtype_and_device_choices():
    model = aim_rt.load_model(GOLDEN / "stage2_single.safetensors", dtype="bf16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(aim_rt.AiMError, match="unsupported dtype"):
        aim_rt.load_model(GOLDEN / "stage2_single.safetensors", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(aim_rt.AiMError, match="no CUDA GPU"):
            aim_rt.load_model(GOLDEN / "stage2_single.safetensors", device="cuda")


def test_models_are_built_without_the_default_init_and_every_weight_is_assigned():
    """Loading and random_model skip torch's default init (its draws are overwritten): every parameter must
    then come from the weights or the seed, never from whatever the default init or fresh memory held."""
    import aim_rt

    cfg = aim_rt.AiMConfig(d_model=64, n_layer=2, vocab_size=32, num_classes=3, num_tokens=4, d_state=16,
                           headdim=16, adaln_group=True, num_groups=2)
    torch.manual_seed(0)
    a = aim_rt.random_model(cfg, seed=3).state_dict()
    torch.manual_seed(1)
    torch.empty(10_000_000).normal_()  # dirty the allocator's free memory
    b = aim_rt.random_model(cfg, seed=3).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the default init is back for everyone else
    torch.manual_seed(0)
    assert torch.nn.Linear(8, 8).weight.abs().sum() > 0
