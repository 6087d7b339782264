"""The reference against vectors the official implementation produced (fp32): ≤ 1e-4 relative, max |diff| / max |ref|."""

import json

import pytest
import torch

import aim_rt
from conftest import GOLDEN, STAGE2_GOLDENS, golden, rel_err

TOL = 1e-4


@pytest.mark.parametrize("name", STAGE2_GOLDENS)
def test_teacher_logits_match_official(name):
    g, _ = golden(name)
    model = aim_rt.load_model(GOLDEN / f"{name}.safetensors")
    got = model.teacher_logits(g["golden.classes"], g["golden.tokens"])
    assert got.shape == g["golden.logits_teacher"].shape
    assert rel_err(got, g["golden.logits_teacher"]) <= TOL


@pytest.mark.parametrize("name", STAGE2_GOLDENS)
def test_sampler_logits_match_official(name):
    g, meta = golden(name)
    model = aim_rt.load_model(GOLDEN / f"{name}.safetensors")
    got = aim_rt.sampler_logits(model, g["golden.classes"], g["golden.tokens"], meta["cfg_scale"])
    assert got.shape == g["golden.logits_sampler_cfg"].shape
    assert rel_err(got, g["golden.logits_sampler_cfg"]) <= TOL


@pytest.mark.parametrize("name", STAGE2_GOLDENS)
def test_semantic_switches_are_detected(name):
    """The goldens are sensitive to the conventions: the training position convention must not match them."""
    g, meta = golden(name)
    model = aim_rt.load_model(GOLDEN / f"{name}.safetensors")
    wrong = aim_rt.sampler_logits(model, g["golden.classes"], g["golden.tokens"], meta["cfg_scale"], position_offset=0)
    assert rel_err(wrong, g["golden.logits_sampler_cfg"]) > 1e-2


def test_vq_decoder_matches_official():
    g, meta = golden("vq_small")
    vq = aim_rt.load_vq(GOLDEN / "vq_small.safetensors")
    assert vq.config.ch_mult == tuple(meta["config"]["ch_mult"])
    images = vq.decode_tokens(g["golden.indices"])
    assert images.shape == g["golden.images"].shape
    assert rel_err(images, g["golden.images"]) <= TOL


@pytest.mark.parametrize("preset", ["AiM-B", "AiM-L", "AiM-XL"])
def test_presets_match_official_layouts(preset):
    layouts = json.loads((GOLDEN / "official_layouts.json").read_text())[preset]
    cfg = aim_rt.preset(preset)
    assert cfg == aim_rt.AiMConfig.from_official(layouts["config"])
    with torch.device("meta"):
        model = aim_rt.model.AiM(cfg)
        vq = aim_rt.vq.VQModel(aim_rt.VQConfig())
    ours = {"mamba." + k: list(v.shape) for k, v in model.state_dict().items()}
    ours.update({"vqvae." + k: list(v.shape) for k, v in vq.state_dict().items()})
    official = {k: v for k, v in layouts["keys"].items() if k != "vqvae.quantize.codebook_used"}
    assert ours == official
    assert sum(p.numel() for p in model.parameters()) == layouts["params_mamba"]
    assert sum(p.numel() for p in vq.parameters()) == layouts["params_vqvae"]
