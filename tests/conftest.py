import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import aim_rt
from aim_rt.loading import attach_vq, save_model

GOLDEN = Path(__file__).parent / "golden"
STAGE2_GOLDENS = ["stage2_single", "stage2_group"]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def golden(name: str):
    return load_file(str(GOLDEN / f"{name}.safetensors")), json.loads((GOLDEN / f"{name}.json").read_text())


TINY = aim_rt.AiMConfig(d_model=64, n_layer=2, vocab_size=64, num_classes=5, num_tokens=16, d_state=16, headdim=16)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A small self-consistent checkpoint directory: random stage 2 (vocab 64) + the golden VQ (64 codes)."""
    model = aim_rt.random_model(TINY, seed=1)
    attach_vq(model, aim_rt.load_vq(GOLDEN / "vq_small.safetensors"))
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny", {"cfg_scale": 2.0, "top_k": 0, "top_p": 1.0})
