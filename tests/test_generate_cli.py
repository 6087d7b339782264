"""`aim-rt generate` end to end on CPU: outputs, determinism, resume after an interrupt, clear errors."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import aim_rt
from aim_rt.backends import TorchBackend
from aim_rt.cli import app
from aim_rt.generate import parse_classes, plan_images, run
from aim_rt.sampling import SamplingSettings
from conftest import GOLDEN

runner = CliRunner()


def generate(*args):
    return runner.invoke(app, ["generate", *map(str, args)])


def text(res) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(res.output.split())


def test_generate_writes_pngs_npz_tokens_and_grid(tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    res = generate(tiny_ckpt, "-o", out, "-c", "0,3", "-n", "3", "-b", "4", "--seed", "7")
    assert res.exit_code == 0, res.output
    pngs = sorted(p.name for p in (out / "images").glob("*.png"))
    assert pngs == ["0000_00000.png", "0000_00001.png", "0000_00002.png", "0003_00000.png", "0003_00001.png",
                    "0003_00002.png"]
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (6, 8, 8, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [0, 0, 0, 3, 3, 3]
    assert np.array_equal(npz["arr_0"][4], np.asarray(Image.open(out / "images" / "0003_00001.png")))
    tokens = np.load(out / "tokens.npz")
    assert tokens["tokens"].shape == (6, 16)
    # the PNG is the decode of the recorded tokens
    model = aim_rt.load_model(tiny_ckpt)
    img = aim_rt.vq.to_uint8(model.decode_tokens(tokens["tokens"][:1])).numpy()[0]
    assert np.array_equal(img, npz["arr_0"][0])
    assert Image.open(out / "grid.png").size[0] > 8 * 3
    assert json.loads((out / "job.json").read_text())["settings"]["cfg_scale"] == 2.0  # the model's recommendation


def test_same_seed_reproduces_and_batch_size_does_not_matter(tiny_ckpt, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert generate(tiny_ckpt, "-o", a, "-c", "1-2", "-n", "3", "-b", "6").exit_code == 0
    assert generate(tiny_ckpt, "-o", b, "-c", "1-2", "-n", "3", "-b", "1").exit_code == 0
    assert generate(tiny_ckpt, "-o", c, "-c", "1-2", "-n", "3", "--seed", "1").exit_code == 0
    ta, tb, tc = (np.load(d / "tokens.npz")["tokens"] for d in (a, b, c))
    assert np.array_equal(ta, tb) and not np.array_equal(ta, tc)
    assert np.array_equal(np.load(a / "samples.npz")["arr_0"], np.load(b / "samples.npz")["arr_0"])


class InterruptingBackend(TorchBackend):
    """Raises KeyboardInterrupt at the start of batch `stop_at`, as Ctrl-C would."""

    def __init__(self, model, stop_at):
        super().__init__(model)
        self.calls, self.stop_at = 0, stop_at

    def sample(self, *args):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return super().sample(*args)


def test_resume_after_interrupt_equals_uninterrupted_run(tiny_ckpt, tmp_path):
    model = aim_rt.load_model(tiny_ckpt)
    settings = SamplingSettings(cfg_scale=2.0, top_k=0, top_p=1.0)
    plan = plan_images(parse_classes("0-4", 5), 2, 0, 5, base_seed=3)
    kw = dict(model_id="tiny", base_seed=3, batch_size=3)
    ref = run(TorchBackend(model), plan, settings, tmp_path / "ref", **kw)

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(InterruptingBackend(model, stop_at=3), plan, settings, out, **kw)
    assert len(list((out / "images").glob("*.png"))) == 6  # two batches finished, nothing half written
    assert not (out / "samples.npz").exists()
    (out / "images" / "stale.png.tmp-999").write_bytes(b"half")  # what a kill -9 mid-write leaves
    counting = InterruptingBackend(model, stop_at=-1)
    res = run(counting, plan, settings, out, **kw)
    assert res.skipped == 6 and res.made == 4 and counting.calls == 2
    assert not list(out.rglob("*.tmp-*"))
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], np.load(tmp_path / "ref" / "samples.npz")["arr_0"])
    assert np.array_equal(res.tokens, ref.tokens)


def test_cli_interrupt_message_and_resume(tiny_ckpt, tmp_path, monkeypatch):
    import aim_rt.backends as backends

    monkeypatch.setitem(backends.BACKENDS, "torch", lambda m, **kw: InterruptingBackend(m, stop_at=2))
    out = tmp_path / "cli"
    res = generate(tiny_ckpt, "-o", out, "-c", "0-4", "-n", "2", "-b", "4")
    assert res.exit_code == 130 and "rerun the same command to resume" in text(res)
    assert len(list((out / "images").glob("*.png"))) == 4
    monkeypatch.setitem(backends.BACKENDS, "torch", lambda m, **kw: TorchBackend(m))
    res = generate(tiny_ckpt, "-o", out, "-c", "0-4", "-n", "2", "-b", "4")
    assert res.exit_code == 0 and "4 already there" in text(res)
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 10


def test_rerun_with_other_settings_is_refused(tiny_ckpt, tmp_path):
    out = tmp_path / "x"
    assert generate(tiny_ckpt, "-o", out, "-c", "0", "-n", "1").exit_code == 0
    res = generate(tiny_ckpt, "-o", out, "-c", "0", "-n", "1", "--cfg-scale", "4")
    assert res.exit_code == 2 and "different run" in text(res) and "settings" in text(res)
    assert generate(tiny_ckpt, "-o", out, "-c", "0", "-n", "1", "--cfg-scale", "4", "--overwrite").exit_code == 0


@pytest.mark.parametrize("args, message", [
    (["-c", "5"], "class 5 is out of range"),
    (["-c", "0-x"], "cannot parse class list"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-p", "0"], "top_p"),
    (["--top-k", "-3"], "top_k"),
    (["--temperature", "0"], "temperature"),
    (["--cfg-scale", "-1"], "cfg_scale"),
    (["--dtype", "int8"], "unsupported dtype"),
    (["--backend", "nope"], "unknown backend"),
    pytest.param(["--backend", "cuda"], "needs a CUDA GPU",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present")),
])
def test_bad_arguments_fail_clearly_and_write_nothing(tiny_ckpt, tmp_path, args, message):
    out = tmp_path / "bad"
    res = generate(tiny_ckpt, "-o", out, *args)
    assert res.exit_code == 2
    assert message in text(res)
    assert not out.exists() or not list((out / "images").glob("*.png"))


def test_missing_checkpoint_and_missing_vq(tmp_path):
    res = generate(tmp_path / "nope", "-o", tmp_path / "o")
    assert res.exit_code == 2 and "no such checkpoint" in text(res)
    res = runner.invoke(app, ["generate", str(GOLDEN / "stage2_single.safetensors"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--vq" in text(res)


def test_random_classes_and_info(tiny_ckpt, tmp_path):
    out = tmp_path / "r"
    assert generate(tiny_ckpt, "-o", out, "-c", "random", "--num-images", "5", "--no-grid", "--no-npz").exit_code == 0
    assert len(list((out / "images").glob("*.png"))) == 5 and not (out / "samples.npz").exists()
    res = runner.invoke(app, ["info", str(tiny_ckpt)])
    assert res.exit_code == 0 and "stage-2 parameters" in text(res)
