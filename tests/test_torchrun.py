"""Sampling under torchrun: CPU ranks with the gloo backend give the same bits as one process, and a run whose
rank was killed resumes with another world size, without duplicates or gaps."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ARGS = ["-n", "3", "-b", "4", "--seed", "11"]  # 30 images of the embedded digits model, 8 batches


def _env(**extra):
    env = dict(os.environ)
    env.pop("AIM_RT_KILL_RANK_AFTER", None)
    # CPU kernels can round differently with another thread count; torchrun gives each rank one thread
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def generate(out, ranks=None, **env):
    cmd = [sys.executable]
    if ranks:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    cmd += ["-m", "aim_rt", "generate", "-o", str(out), *ARGS]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=600)


def outputs(out):
    return np.load(out / "tokens.npz")["tokens"], np.load(out / "samples.npz")["arr_0"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    res = generate(out)
    assert res.returncode == 0, res.stderr
    return out


def test_three_ranks_give_the_single_process_bits(single, tmp_path):
    res = generate(tmp_path, ranks=3)
    assert res.returncode == 0, res.stderr[-3000:]
    tokens, images = outputs(tmp_path)
    ref_tokens, ref_images = outputs(single)
    assert np.array_equal(tokens, ref_tokens) and np.array_equal(images, ref_images)
    shards = [json.loads((tmp_path / "shards" / f"rank-{r}-of-3.json").read_text()) for r in range(3)]
    names = [n for s in shards for n in s["images"]]
    assert len(names) == len(set(names)) == 30  # every image dealt to exactly one rank
    assert sorted(p.stem for p in (tmp_path / "images").glob("*.png")) == sorted(names)


def test_killed_rank_then_resume_with_another_world_size(single, tmp_path):
    res = generate(tmp_path, ranks=2, AIM_RT_KILL_RANK_AFTER="1:1")  # rank 1 dies after its first batch
    assert res.returncode != 0
    assert not (tmp_path / "samples.npz").exists()
    partial = sorted(p.stem for p in (tmp_path / "images").glob("*.png"))
    assert 4 <= len(partial) < 30
    res = generate(tmp_path, ranks=3)
    assert res.returncode == 0, res.stderr[-3000:]
    tokens, images = outputs(tmp_path)
    ref_tokens, ref_images = outputs(single)
    assert np.array_equal(tokens, ref_tokens) and np.array_equal(images, ref_images)
    pngs = sorted(p.stem for p in (tmp_path / "images").glob("*.png"))
    ref_pngs = sorted(p.stem for p in (single / "images").glob("*.png"))
    assert pngs == ref_pngs and not list(tmp_path.rglob("*.tmp-*"))
