"""Issue 13's reproductions: output directories belong to one job, nothing finished is lost or silently wrong, and
every bad input is one line on stderr with exit code 2, before any heavy work."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import aim_rt
from aim_rt.backends import TorchBackend
from aim_rt.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def generate(*args, **kw):
    return runner.invoke(app, ["generate", *map(str, args)], **kw)


def one_line_error(res, *needles, during_run=False):
    """Exit code 2, no traceback, one error line on stderr that holds every needle verbatim; before any work
    (the default) that line is all stderr holds, during a run it follows the banner and progress."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    if during_run:
        lines = [line for line in lines if line.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def cli(*args, env=None, timeout=120, cwd=ROOT):
    """The real console script path (python -m aim_rt), for what only a fresh process shows."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "aim_rt", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)


def ok(res):
    assert res.exit_code == 0, res.output
    return res


# ----- output directories -------------------------------------------------------------------------
def test_overwrite_keeps_files_aim_rt_did_not_write(tiny_ckpt, tmp_path):
    out = tmp_path / "d"
    (out / "images" / "sub").mkdir(parents=True)
    (out / "images" / "IMG.jpg").write_text("x")
    (out / "images" / "sub" / "keep.txt").write_text("y")
    (out / "notes.txt").write_text("z")
    ok(generate(tiny_ckpt, "-c", "3", "-n", "2", "--overwrite", "-o", out))
    ok(generate(tiny_ckpt, "-c", "1", "-n", "1", "--overwrite", "-o", out))  # discards the first job, only it
    assert (out / "images" / "IMG.jpg").read_text() == "x"
    assert (out / "images" / "sub" / "keep.txt").read_text() == "y" and (out / "notes.txt").read_text() == "z"
    assert sorted(p.name for p in (out / "images").glob("*.png")) == ["0001_00000.png"]


def test_files_at_our_names_without_a_record_are_neither_used_nor_deleted(tiny_ckpt, tmp_path):
    out = tmp_path / "d"
    (out / "images").mkdir(parents=True)
    (out / "images" / "0003_00000.png").write_bytes(b"not ours")
    for extra in ([], ["--overwrite"]):
        one_line_error(generate(tiny_ckpt, "-c", "3", "-n", "1", "-o", out, *extra), "0003_00000.png",
                       "no aim-rt job record")
    assert (out / "images" / "0003_00000.png").read_bytes() == b"not ours"


def _hold_lock(directory: Path) -> subprocess.Popen:
    code = ("import sys, time; from aim_rt.joblock import JobLock; l = JobLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_naming_the_holder(tiny_ckpt, tmp_path):
    out = tmp_path / "cc"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        for extra in ([], ["--overwrite"]):
            one_line_error(generate(tiny_ckpt, "-c", "0", "-n", "1", "-o", out, *extra), f"pid {holder.pid}",
                           "in use by another aim-rt job")
        assert not list(out.rglob("*.png"))
    finally:
        holder.kill()
        holder.wait()
    ok(generate(tiny_ckpt, "-c", "0", "-n", "1", "-o", out))  # the dead holder's lock file is taken over
    assert not (out / ".aim-rt.lock").exists()


def test_a_stale_lock_file_is_taken_over(tiny_ckpt, tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    (out / ".aim-rt.lock").write_text(f"999999999 {socket.gethostname()}\n")  # no process holds it
    ok(generate(tiny_ckpt, "-c", "0", "-n", "1", "-o", out))


@pytest.mark.parametrize("second, needle", [
    (["-c", "3", "-n", "2"], "the images planned"),
    (["-c", "0-4", "-n", "1", "--dtype", "bfloat16"], "--dtype"),
    (["-c", "0-4", "-n", "1", "-b", "2"], "--batch-size"),
    (["-c", "0-4", "-n", "1", "--seed", "3"], "--seed"),
    (["-c", "0-4", "-n", "1", "--top-k", "5"], "--top-k"),
])
def test_a_rerun_with_another_plan_or_setting_is_refused_naming_it(tiny_ckpt, tmp_path, second, needle):
    out = tmp_path / "rr"
    ok(generate(tiny_ckpt, "-c", "0-4", "-n", "1", "-b", "4", "-o", out))
    before = (out / "samples.npz").read_bytes()
    args = second if "-b" in second else [*second, "-b", "4"]
    one_line_error(generate(tiny_ckpt, *args, "-o", out), "different run", needle)
    assert (out / "samples.npz").read_bytes() == before


class FailingBackend(TorchBackend):
    def sample(self, *args):
        raise KeyboardInterrupt  # as a kill in the middle of the new job would


def test_overwrite_stopped_midway_leaves_no_old_final_files(tiny_ckpt, tmp_path, monkeypatch):
    import aim_rt.backends as backends

    out = tmp_path / "ow"
    ok(generate(tiny_ckpt, "-c", "0-4", "-n", "1", "-o", out))
    monkeypatch.setitem(backends.BACKENDS, "torch", lambda m, **kw: FailingBackend(m))
    res = generate(tiny_ckpt, "-c", "1", "-n", "2", "--seed", "5", "--overwrite", "-o", out)
    assert res.exit_code == 130
    assert json.loads((out / "job.json").read_text())["seed"] == 5
    assert not any((out / f).exists() for f in ("samples.npz", "tokens.npz", "grid.png"))
    assert not list((out / "images").glob("*.png"))


def _tokens(out):
    return np.load(out / "tokens.npz")["tokens"]


@pytest.mark.parametrize("damage", ["out_of_vocabulary", "truncated_npy", "truncated_png", "float_npy"])
def test_a_damaged_finished_file_is_remade_never_assembled(tiny_ckpt, tmp_path, damage):
    out = tmp_path / "dmg"
    args = ["-c", "0-1", "-n", "2", "-b", "2", "-o", out]
    ok(generate(tiny_ckpt, *args))
    good, images = _tokens(out), np.load(out / "samples.npz")["arr_0"]
    npy, png = out / "tokens" / "0001_00000.npy", out / "images" / "0001_00000.png"
    if damage == "out_of_vocabulary":
        np.save(npy, np.full(16, 10_000, dtype=np.int64))
    elif damage == "truncated_npy":
        npy.write_bytes(npy.read_bytes()[:100])
    elif damage == "float_npy":
        np.save(npy, np.zeros(16, dtype=np.float32))
    else:
        png.write_bytes(png.read_bytes()[:60])
    res = ok(generate(tiny_ckpt, *args))
    assert "remade 1 damaged" in " ".join(res.stderr.split())
    assert np.array_equal(_tokens(out), good)
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], images)


def test_export_refuses_a_foreign_directory_and_never_deletes_its_files(tiny_ckpt, tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "user.txt").write_text("mine")
    one_line_error(runner.invoke(app, ["export", str(tiny_ckpt), "--out", str(out)]), "not an aim-rt export",
                   "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["user.txt"]
    ok(runner.invoke(app, ["export", str(tiny_ckpt), "--out", str(out), "--overwrite"]))
    ok(runner.invoke(app, ["export", str(tiny_ckpt), "--out", str(out)]))  # an aim-rt export: replaced
    assert (out / "user.txt").read_text() == "mine" and (out / "manifest.json").exists()


def test_export_bfloat16_with_a_vq_works_and_leaves_the_model_alone(tmp_path):
    from aim_rt.exporters.onnx_export import export_onnx

    model = aim_rt.load_model(ROOT / "aim_rt" / "data" / "digits")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    manifest = export_onnx(model, tmp_path / "bf16", dtype="bfloat16")
    assert manifest["dtype"] == "bfloat16" and manifest["vq_dtype"] == "float32"
    assert model.dtype == aim_rt.loading.resolve_dtype("float32") and model.vq.dtype == model.dtype
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and after[k].equal(v) for k, v in before.items())


def test_export_checks_format_and_batch_range_before_any_work(tiny_ckpt, tmp_path):
    for args, needle in ((["--format", "tflite"], "--format"),
                         (["--format", "trt", "--batch-min", "8", "--batch-max", "2"], "--batch-min")):
        out = tmp_path / "never"
        one_line_error(runner.invoke(app, ["export", str(tiny_ckpt), "--out", str(out), *args]), needle)
        assert not out.exists()


# ----- silent garbage and sizes -------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["--cfg-scale", "inf"], "--cfg-scale"),
    (["--cfg-scale", "1e300"], "--cfg-scale"),
    (["--cfg-scale", "nan"], "--cfg-scale"),
    (["--temperature", "1e-45"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--top-p", "nan"], "--top-p"),
    (["-c", "random", "-n", "3"], "--num-images"),
    (["--num-images", "3"], "--classes random"),
    (["-c", "\u0663"], "ASCII digits"),
    (["-c", "0-1000000000"], "out of range"),
    (["-o", ""], "--out is empty"),
    (["--device", "gpu0"], "--device"),
    (["--device", "meta"], "--device"),
    (["-b", "0"], "--batch-size"),
])
def test_bad_values_are_refused_before_any_work(tiny_ckpt, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)  # `-o ''` must not write into the current directory
    if "-o" not in args:
        args = [*args, "-o", tmp_path / "out"]
    one_line_error(generate(tiny_ckpt, *args), needle)
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("job.json"))


def test_huge_runs_are_refused_at_once_with_what_they_need(tiny_ckpt, tmp_path):
    for args in (["-c", "3", "-n", "1000000000"], ["-c", "random", "--num-images", "10000000000"]):
        start = time.monotonic()
        line = one_line_error(generate(tiny_ckpt, *args, "-o", tmp_path / "x"), "would need")
        assert time.monotonic() - start < 5 and "GB" in line
    assert not (tmp_path / "x").exists()


def test_a_config_that_does_not_match_the_weights_fails_before_building(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").symlink_to(tiny_ckpt / "model.safetensors")
    config = json.loads((tiny_ckpt / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "n_layer": 1_000_000}))
    start = time.monotonic()
    one_line_error(generate(bad, "-o", tmp_path / "o"), "'n_layer'", "1000000")
    assert time.monotonic() - start < 5
    (bad / "config.json").write_text("[]")
    one_line_error(generate(bad, "-o", tmp_path / "o"), "config", "not an object")
    (bad / "config.json").write_text(json.dumps({**config, "aim_rt_sampling": {"cfg": 3}}))
    one_line_error(generate(bad, "-o", tmp_path / "o"), "aim_rt_sampling", "'cfg'")


# ----- files handed in ----------------------------------------------------------------------------
def _prefixes(tmp_path):
    np.save(tmp_path / "float.npy", np.array([1.7, 2.2]))
    np.save(tmp_path / "object.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "text.npy").write_text("1 2 3\n")
    np.savez(tmp_path / "arr.npz", a=np.arange(3))
    return {"float.npy": "float64", "object.npy": "pickled", "text.npy": "not a readable", "arr.npz": ".npz",
            "missing.npy": "no such file"}


def test_a_prefix_must_be_an_integer_npy(tiny_ckpt, tmp_path):
    for name, needle in _prefixes(tmp_path).items():
        one_line_error(generate(tiny_ckpt, "-c", "0", "-n", "1", "--prefix", tmp_path / name, "-o", tmp_path / "o"),
                       "--prefix", needle)


def test_output_paths_that_cannot_work(tiny_ckpt, tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        cases = [(afile, "is a file"), (afile / "sub", "which is a file"), (tmp_path / ("a" * 300), "too long")]
        if os.geteuid() != 0:  # root writes anywhere
            cases.append((readonly / "out", "not writable"))
        for out, needle in cases:
            one_line_error(generate(tiny_ckpt, "-c", "0", "-n", "1", "-o", out), needle)
    finally:
        readonly.chmod(0o700)
    one_line_error(generate(tiny_ckpt, "--artifacts", afile, "--backend", "onnxruntime", "-o", tmp_path / "o"),
                   "--artifacts", "is a file")
    one_line_error(generate(tiny_ckpt, "--engines", afile, "--backend", "onnxruntime", "-o", tmp_path / "o"),
                   "--engines", "is a file")


def test_user_text_is_never_markup(tiny_ckpt, tmp_path):
    out = tmp_path / "x[/x]" / "[bold]y"
    res = ok(generate(tiny_ckpt, "-c", "0", "-n", "1", "-o", out))
    assert f"wrote {out / 'samples.npz'}" in res.stderr
    empty = tmp_path / "artifacts"
    empty.mkdir()
    res = generate(tiny_ckpt, "--backend", "tensorrt", "--artifacts", empty, "-o", tmp_path / "t")
    if "TensorRT is not installed" in res.stderr:
        one_line_error(res, "pip install 'aim-rt[tensorrt]'")


def test_a_full_disk_is_one_line_and_keeps_finished_images(tiny_ckpt, tmp_path, monkeypatch):
    import errno

    import aim_rt.outputs as outputs

    out = tmp_path / "full"
    args = ["-c", "0-4", "-n", "1", "-b", "2", "-o", out]
    real_fsync, writes = os.fsync, []

    def fsync(fd):
        writes.append(fd)
        if len(writes) > 5:  # job.json and two images (.npy + .png each) go through, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(outputs.os, "fsync", fsync)
    one_line_error(generate(*[tiny_ckpt, *args]), "no space left", "finished images are kept",
                   "rerun the same command", during_run=True)
    kept = sorted(p.name for p in (out / "images").glob("*.png"))
    assert len(kept) == 2 and not list(out.rglob("*.tmp-*"))
    monkeypatch.setattr(outputs.os, "fsync", real_fsync)
    res = ok(generate(*[tiny_ckpt, *args]))
    assert "2 already there" in " ".join(res.stderr.split())


# ----- artifacts, distributed start-up, doctor ----------------------------------------------------
def test_artifacts_from_unknown_or_other_weights_are_refused(tiny_ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    from aim_rt.exporters.onnx_export import export_onnx

    model = aim_rt.load_model(tiny_ckpt)
    export_onnx(model, tmp_path / "nohash")  # no model_sha256
    export_onnx(model, tmp_path / "other", model_sha256="0" * 64)
    for name, needle in (("nohash", "no model hash"), ("other", "other weights")):
        one_line_error(generate(tiny_ckpt, "--backend", "onnxruntime", "--artifacts", tmp_path / name, "-c", "0",
                                "-n", "1", "-o", tmp_path / "o"), needle, "aim-rt export")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rank, missing", [(0, "rank(s) 1 of 2"), (1, "rank 0")])
def test_distributed_start_up_times_out_naming_the_missing_rank(tmp_path, rank, missing):
    env = {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "AIM_RT_DIST_TIMEOUT": "2"}
    start = time.monotonic()
    res = cli("generate", "-n", "1", "-o", tmp_path / "d", env=env, timeout=60)
    assert time.monotonic() - start < 40
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert missing in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_doctor_without_cuda_python(monkeypatch):
    import importlib.util

    from aim_rt.doctor import report

    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name == "cuda" or name.startswith("cuda."):
            raise ModuleNotFoundError("No module named 'cuda'")  # what find_spec does for a missing parent
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    info = report()
    assert info["cuda-python"] is None and info["nvrtc"] is None


def test_usage_errors_from_the_console_script_are_one_line(tmp_path):
    for args, needle in ((["generate", "-n", "abc"], "--images-per-class"), (["generate", "--frob"], "--frob"),
                         (["export", "--out", str(tmp_path / "e"), "--format", "tflite"], "--format")):
        res = cli(*args)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], res.stderr


# ----- the loader (issue 12) ----------------------------------------------------------------------
def test_loaded_weights_are_held_once():
    """In a fresh process: the bytes of every live tensor after load_model are the model's own, within 10%."""
    code = """
import gc, torch, aim_rt
from aim_rt.cli import default_model_path
model = aim_rt.load_model(default_model_path())
gc.collect()
live = {}
for obj in gc.get_objects():
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        live[storage.data_ptr()] = storage.nbytes()
own = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(sum(live.values()), own)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    live, own = map(int, res.stdout.split())
    assert abs(live - own) <= 0.1 * own, (live, own)


def test_checkpoint_hash_is_read_once(tiny_ckpt, tmp_path):
    import shutil

    from aim_rt.checkpoint import open_checkpoint

    copy = shutil.copytree(tiny_ckpt, tmp_path / "copy")
    ckpt = open_checkpoint(copy)
    first = ckpt.sha256()
    (copy / "model.safetensors").unlink()  # a second read would fail
    assert ckpt.sha256() == first
    loaded = aim_rt.loading.load(tiny_ckpt)
    assert loaded.sha256 == first and loaded.source == str(tiny_ckpt)
    assert getattr(loaded.model, "checkpoint", None) is None


def test_a_refused_directory_stops_every_torchrun_rank(tiny_ckpt, tmp_path):
    out = tmp_path / "tr"
    ok(generate(tiny_ckpt, "-c", "0", "-n", "1", "-o", out))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "aim_rt",
           "generate", str(tiny_ckpt), "-c", "0", "-n", "1", "--seed", "4", "-o", str(out)]
    start = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert time.monotonic() - start < 120
    assert res.returncode != 0 and "different run" in res.stderr and "--seed" in res.stderr, res.stderr


def test_ranks_sharing_the_default_artifacts_cache_export_once(tiny_ckpt, tmp_path, monkeypatch):
    """torchrun ranks all open the onnxruntime backend at once: one exports, the others wait and reuse it."""
    pytest.importorskip("onnxruntime")
    import threading

    from aim_rt.generate import open_backend

    monkeypatch.setenv("AIM_RT_CACHE", str(tmp_path / "cache"))
    loaded = aim_rt.loading.load(tiny_ckpt)
    errors = []

    def open_one():
        try:
            open_backend("onnxruntime", loaded.model, model_sha256=loaded.sha256, source=loaded.source,
                         dtype="float32")
        except Exception as e:  # collected: the test names it
            errors.append(repr(e))

    threads = [threading.Thread(target=open_one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    manifests = list((tmp_path / "cache").rglob("manifest.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["model_sha256"] == loaded.sha256
