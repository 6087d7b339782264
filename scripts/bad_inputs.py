"""The bad-input battery of issue 13: every case as a real `python -m aim_rt` process, classified and totalled.

    python scripts/bad_inputs.py [--jobs 4] [--keep DIR]

A case expects either a clear error (exit code 2, exactly one `error:` line on stderr, no traceback) or a
correct result (exit 0 and a check of what was written). Totals: cases tried, clear errors, tracebacks (or any
other exit code), silent wrong results (exit 0 where an error was due, or a failed check), hangs (past the
timeout), finished outputs lost (a finished image or a user's file gone or changed when it should not be).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 120


@dataclass
class Case:
    name: str
    args: list[str]
    expect: str = "error"  # "error", "ok", or "killed" (the process kills itself on purpose)
    needle: str = ""  # expected in the error line
    env: dict = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None
    check: Callable[[Path], str | None] | None = None  # after the run: a problem, or None
    guard: Callable[[Path], dict] | None = None  # files that must survive the case unchanged


def run_cli(args: list[str], env: dict, cwd: Path) -> tuple[int | None, str, float]:
    full = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT), **env}
    start = time.monotonic()
    try:
        res = subprocess.run([sys.executable, "-m", "aim_rt", *args], capture_output=True, text=True, env=full,
                             cwd=cwd, timeout=TIMEOUT_S)
        return res.returncode, res.stderr, time.monotonic() - start
    except subprocess.TimeoutExpired as e:
        return None, (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""), \
            time.monotonic() - start


def snapshot(paths: list[Path]) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


def classify(case: Case, work: Path) -> tuple[str, str]:
    guarded = case.guard(work) if case.guard else {}
    code, err, seconds = run_cli(case.args, case.env, work)
    lost = [p for p, h in guarded.items() if not Path(p).is_file() or
            hashlib.sha256(Path(p).read_bytes()).hexdigest() != h]
    last = (err.strip().splitlines() or [""])[-1][:160]
    if code is None:
        return "hang", f"no exit within {TIMEOUT_S} s"
    if lost:
        return "lost", f"{len(lost)} finished/user files gone or changed (first {lost[0]})"
    if "Traceback" in err or code not in (0, 2, 130, 17):
        return "traceback", f"exit {code}: {last}"
    if case.expect == "error":
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        if code == 0:
            return "silent", "exit 0 where an error was due"
        if code != 2 or len(errors) != 1 or case.needle not in errors[0]:
            return "traceback", f"exit {code}, {len(errors)} error lines: {last}"
        return "clear", f"{errors[0][:150]} ({seconds:.1f} s)"
    if case.expect == "killed" and code != 17:
        return "silent", f"exit {code}, expected the injected kill"
    if case.expect == "ok" and code != 0:
        return "traceback", f"exit {code}: {last}"
    problem = case.check(work) if case.check else None
    if problem:
        return "silent", problem
    return "ok", f"as expected ({seconds:.1f} s)"


# ----- fixtures ----------------------------------------------------------------------------------
def make_tiny(base: Path) -> Path:
    """A small random AiM with the golden test VQ (the CI tests' tiny model): seconds per run."""
    import aim_rt
    from aim_rt.loading import attach_vq, save_model

    cfg = aim_rt.AiMConfig(d_model=64, n_layer=2, vocab_size=64, num_classes=5, num_tokens=16, d_state=16,
                           headdim=16)
    model = aim_rt.random_model(cfg, seed=1)
    attach_vq(model, aim_rt.load_vq(ROOT / "tests" / "golden" / "vq_small.safetensors"))
    return save_model(model, base / "tiny", {"cfg_scale": 2.0, "top_k": 0, "top_p": 1.0})


def finished_run(tiny: Path, ref: Path) -> Callable[[Path], None]:
    """Setup: a copy of a finished reference run in work/out."""
    def setup(work: Path) -> None:
        import shutil

        shutil.copytree(ref, work / "out")
    return setup


def guard_images(work: Path) -> dict:
    return snapshot(sorted((work / "out" / "images").glob("*.png")) + [work / "out" / "samples.npz"])


def tokens_equal(ref: Path) -> Callable[[Path], str | None]:
    def check(work: Path) -> str | None:
        import numpy as np

        got = np.load(work / "out" / "tokens.npz")["tokens"]
        want = np.load(ref / "tokens.npz")["tokens"]
        return None if np.array_equal(got, want) else "tokens.npz differs from the uninterrupted run"
    return check


def build_cases(tiny: Path, ref: Path, export_nohash: Path, export_other: Path) -> list[Case]:
    import numpy as np

    T = str(tiny)
    base = ["generate", T, "-c", "0-4", "-n", "1", "-b", "2"]  # the reference run's plan
    out = ["-o", "out"]
    cases: list[Case] = []

    def err(name, args, needle="", **kw):
        cases.append(Case(name, args, "error", needle, **kw))

    # -- output directories
    def foreign(work):
        (work / "out" / "images" / "sub").mkdir(parents=True)
        (work / "out" / "images" / "IMG.jpg").write_text("x")
        (work / "out" / "images" / "sub" / "f.txt").write_text("y")

    def foreign_kept(work):
        return None if (work / "out/images/IMG.jpg").exists() and (work / "out/images/sub/f.txt").exists() \
            else "a foreign file was deleted"
    cases.append(Case("overwrite beside foreign files", [*base, "--overwrite", *out], "ok", setup=foreign,
                      check=foreign_kept, guard=lambda w: snapshot([w / "out/images/IMG.jpg", w / "out/images/sub/f.txt"])))

    def finished_with_foreign(work):
        finished_run(tiny, ref)(work)
        (work / "out" / "images" / "IMG.jpg").write_text("x")
    def only_new_job(work):
        pngs = sorted(p.name for p in (work / "out" / "images").glob("*.png"))
        if not (work / "out/images/IMG.jpg").exists():
            return "a foreign file was deleted"
        return None if pngs == ["0001_00000.png", "0001_00001.png"] else f"images left: {pngs}"
    cases.append(Case("overwrite of a job keeps foreign files", ["generate", T, "-c", "1", "-n", "2", "--overwrite",
                      *out], "ok", setup=finished_with_foreign, check=only_new_job,
                      guard=lambda w: snapshot([w / "out/images/IMG.jpg"])))

    def locked(work):
        finished_run(tiny, ref)(work)
        code = ("import sys, time; from aim_rt.joblock import JobLock; JobLock(sys.argv[1]).acquire(); "
                "print('ok', flush=True); time.sleep(30)")
        proc = subprocess.Popen([sys.executable, "-c", code, str(work / "out")], stdout=subprocess.PIPE, text=True,
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        proc.stdout.readline()
        (work / "holder.pid").write_text(str(proc.pid))
    err("second writer while a job runs", [*base, "--seed", "3", "--overwrite", *out], "in use", setup=locked,
        guard=guard_images)

    def stale(work):
        finished_run(tiny, ref)(work)
        (work / "out" / ".aim-rt.lock").write_text(f"999999999 {socket.gethostname()}\n")
    cases.append(Case("stale lock of a dead process", [*base, *out], "ok", setup=stale, guard=guard_images,
                      check=tokens_equal(ref)))
    for name, extra, needle in (("rerun with another plan", ["-c", "3", "-n", "2"], "images planned"),
                                ("rerun with another dtype", [*base[2:], "--dtype", "bfloat16"], "--dtype"),
                                ("rerun with another seed", [*base[2:], "--seed", "9"], "--seed"),
                                ("rerun with another cfg", [*base[2:], "--cfg-scale", "3"], "--cfg-scale"),
                                ("rerun with another batch size", ["-c", "0-4", "-n", "1", "-b", "3"], "--batch-size"),
                                ("rerun with another backend", [*base[2:], "--backend", "onnxruntime"], "--backend")):
        err(name, ["generate", T, *extra, *out], needle, setup=finished_run(tiny, ref), guard=guard_images)

    def no_stale_finals(work):
        job = json.loads((work / "out" / "job.json").read_text())
        if job.get("seed") == 4 and (work / "out" / "samples.npz").exists():
            return "an old samples.npz beside the new job record"
        return None
    cases.append(Case("overwrite killed midway", ["generate", T, "-c", "1", "-n", "2", "--seed", "4", "--overwrite",
                      *out], "killed", env={"AIM_RT_KILL_RANK_AFTER": "0:0"}, setup=finished_run(tiny, ref),
                      check=no_stale_finals))

    def damage(kind):
        def setup(work):
            finished_run(tiny, ref)(work)
            npy, png = work / "out/tokens/0001_00000.npy", work / "out/images/0001_00000.png"
            if kind == "vocab":
                np.save(npy, np.full(16, 10_000, dtype=np.int64))
            elif kind == "npy":
                npy.write_bytes(npy.read_bytes()[:90])
            else:
                png.write_bytes(png.read_bytes()[:60])
        return setup
    for kind in ("vocab", "npy", "png"):
        cases.append(Case(f"damaged finished file ({kind})", [*base, *out], "ok", setup=damage(kind),
                          check=tokens_equal(ref)))

    def user_file(work):
        (work / "exp").mkdir()
        (work / "exp" / "user.txt").write_text("mine")
    err("export into a foreign non-empty dir", ["export", T, "--out", "exp"], "not an aim-rt export", setup=user_file,
        guard=lambda w: snapshot([w / "exp/user.txt"]))
    cases.append(Case("export --overwrite beside a user's file", ["export", T, "--out", "exp", "--overwrite"], "ok",
                      setup=user_file, guard=lambda w: snapshot([w / "exp/user.txt"])))

    # -- silent garbage, sizes, hangs
    for flag, value in (("--cfg-scale", "inf"), ("--cfg-scale", "1e300"), ("--cfg-scale", "nan"),
                        ("--cfg-scale", "-1"), ("--temperature", "1e-45"), ("--temperature", "0"),
                        ("--temperature", "inf"), ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan"),
                        ("--top-k", "-1"), ("-b", "0"), ("-n", "0"), ("--seed", "-1"), ("--grid-cols", "0"),
                        ("--dtype", "int8"), ("--backend", "nope"), ("--position-convention", "x")):
        err(f"{flag} {value}", ["generate", T, "-c", "0", flag, value, *out], "")
    err("-c 3 -n 1000000000", ["generate", T, "-c", "3", "-n", "1000000000", *out], "would need")
    err("-c 0-1000000000", ["generate", T, "-c", "0-1000000000", *out], "out of range")
    err("--num-images 1e10", ["generate", T, "-c", "random", "--num-images", "10000000000", *out], "would need")
    err("--num-images 1e10 as float", ["generate", T, "-c", "random", "--num-images", "1e10", *out], "--num-images")
    err("-n with -c random", ["generate", T, "-c", "random", "-n", "3", *out], "--num-images")
    err("--num-images without random", ["generate", T, "--num-images", "3", *out], "--classes random")
    err("Arabic-Indic class digits", ["generate", T, "-c", "\u0663", *out], "ASCII")
    err("class range reversed", ["generate", T, "-c", "4-1", *out], "empty")
    err("class list empty", ["generate", T, "-c", ",", *out], "no classes")
    err("-o ''", ["generate", T, "-o", ""], "--out is empty")

    def big_layers(work):
        (work / "bad").mkdir()
        (work / "bad" / "model.safetensors").symlink_to(tiny / "model.safetensors")
        config = json.loads((tiny / "config.json").read_text())
        (work / "bad" / "config.json").write_text(json.dumps({**config, "n_layer": 1_000_000}))
    err("n_layer 1000000 in config.json", ["generate", "bad", *out], "n_layer", setup=big_layers)

    def config_list(work):
        (work / "bad").mkdir()
        (work / "bad" / "model.safetensors").symlink_to(tiny / "model.safetensors")
        (work / "bad" / "config.json").write_text("[]")
    err("config.json is []", ["generate", "bad", *out], "not an object", setup=config_list)
    err("--config missing", ["generate", T, "--config", "nope.json", *out], "nope.json")

    for rank, needle in (("0", "rank(s) 1"), ("1", "rank 0")):
        with socket.socket() as s:  # a port of its own: the two lone ranks must not find each other
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        err(f"WORLD_SIZE=2, rank {rank} alone", ["generate", T, "-c", "0", *out], needle,
            env={"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": port, "AIM_RT_DIST_TIMEOUT": "3"})
    err("--artifacts without a model hash", ["generate", T, "-c", "0", "--backend", "onnxruntime", "--artifacts",
        str(export_nohash), *out], "no model hash")
    err("--artifacts of other weights", ["generate", T, "-c", "0", "--backend", "onnxruntime", "--artifacts",
        str(export_other), *out], "other weights")

    # -- files handed in
    def prefixes(work):
        np.save(work / "float.npy", np.array([1.7, 2.2]))
        np.save(work / "object.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
        (work / "text.npy").write_text("1 2 3\n")
        np.savez(work / "arr.npz", a=np.arange(3))
        np.save(work / "long.npy", np.zeros(40, dtype=np.int64))
        np.save(work / "vocab.npy", np.array([999], dtype=np.int64))
    for name in ("float.npy", "object.npy", "text.npy", "arr.npz", "missing.npy", "long.npy", "vocab.npy"):
        err(f"--prefix {name}", ["generate", T, "-c", "0", "--prefix", name, *out], "prefix", setup=prefixes)

    # -- paths, devices
    def files(work):
        (work / "afile").write_text("x")
        (work / "ro").mkdir()
        (work / "ro").chmod(0o500)
    err("-o is a file", ["generate", T, "-o", "afile"], "is a file", setup=files)
    err("-o under a file", ["generate", T, "-o", "afile/sub"], "which is a file", setup=files)
    if os.geteuid() != 0:
        err("-o read-only", ["generate", T, "-o", "ro/out"], "not writable", setup=files)
    err("-o too long", ["generate", T, "-o", "a" * 300], "too long")
    err("--artifacts is a file", ["generate", T, "--backend", "onnxruntime", "--artifacts", "afile", *out],
        "is a file", setup=files)
    err("--engines is a file", ["generate", T, "--backend", "onnxruntime", "--engines", "afile", *out], "is a file",
        setup=files)
    err("--device gpu0", ["generate", T, "--device", "gpu0", *out], "--device")
    err("--device meta", ["generate", T, "--device", "meta", *out], "--device")
    err("--device cuda:7 (no GPU here or not that many)", ["generate", T, "--device", "cuda:7", *out], "--device")

    def markup_check(work):
        hits = list(work.rglob("samples.npz"))
        return None if any("[/x]" in str(p) for p in hits) else "no output under the path with [/x]"
    cases.append(Case("-o with rich markup [/x]", ["generate", T, "-c", "0", "-n", "1", "-o", "x[/x]/[bold]y"], "ok",
                      check=markup_check))

    def markup_model(work):
        import shutil

        shutil.copytree(tiny, work / "m[" / "x]")
    cases.append(Case("export of a model under a path with [/x]", ["export", "m[/x]", "--out", "e"], "ok",
                      setup=markup_model, check=lambda w: None if (w / "e/manifest.json").exists() else "no manifest"))

    def empty_dir(work):
        (work / "art").mkdir()
    err("tensorrt hint printed intact", ["generate", T, "--backend", "tensorrt", "--artifacts", "art", *out],
        "aim-rt[tensorrt]", setup=empty_dir)
    err("unknown option", ["generate", "--frob"], "--frob")
    err("-n abc", ["generate", "-n", "abc"], "--images-per-class")
    err("missing model", ["generate", "nope/nope/x", *out], "no such checkpoint")
    err("--vq missing", ["generate", T, "--vq", "nope.pt", *out], "nope.pt")

    # -- export, doctor
    err("export --format tflite", ["export", T, "--out", "e", "--format", "tflite"], "--format")
    err("export bad batch range", ["export", T, "--out", "e", "--format", "trt", "--batch-min", "8", "--batch-max",
        "2"], "--batch-min")
    err("export --opset 7", ["export", T, "--out", "e", "--opset", "7"], "--opset")
    err("export --prefix-len 99", ["export", T, "--out", "e", "--prefix-len", "99"], "prefix")
    err("export --out ''", ["export", T, "--out", ""], "--out is empty")

    def bf16_manifest(work):
        m = json.loads((work / "e" / "manifest.json").read_text())
        return None if m["dtype"] == "bfloat16" and m["vq_dtype"] == "float32" else f"manifest {m['dtype']}"
    cases.append(Case("export --dtype bfloat16 with a VQ", ["export", "--out", "e", "--dtype", "bfloat16"], "ok",
                      check=bf16_manifest))
    cases.append(Case("doctor", ["doctor"], "ok"))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        tiny = make_tiny(base)
        ref = base / "ref"
        code, err, _ = run_cli(["generate", str(tiny), "-c", "0-4", "-n", "1", "-b", "2", "-o", str(ref)], {}, base)
        assert code == 0, err
        import aim_rt
        from aim_rt.exporters.onnx_export import export_onnx

        model = aim_rt.load_model(tiny)
        export_onnx(model, base / "nohash")
        export_onnx(model, base / "other", model_sha256="0" * 64)
        cases = [c for c in build_cases(tiny, ref, base / "nohash", base / "other") if args.only in c.name]

        def one(i_case):
            i, case = i_case
            work = base / f"case{i:03d}"
            work.mkdir()
            if case.setup:
                case.setup(work)
            try:
                return case, classify(case, work)
            finally:
                holder = work / "holder.pid"
                if holder.exists():
                    try:
                        os.kill(int(holder.read_text()), 9)
                    except ProcessLookupError:  # it already died (e.g. code without the lock module)
                        pass
                (work / "ro").exists() and (work / "ro").chmod(0o700)

        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(one, enumerate(cases)))
    totals = {k: 0 for k in ("clear", "ok", "traceback", "silent", "hang", "lost")}
    for case, (verdict, detail) in results:
        totals[verdict] += 1
        print(f"{verdict:9s} {case.name}: {detail}")
    print()
    print(f"cases tried: {len(results)}")
    print(f"clear errors (one line, exit 2): {totals['clear']}")
    print(f"correct results (exit 0, checked): {totals['ok']}")
    print(f"tracebacks or other exits: {totals['traceback']}")
    print(f"silent wrong results: {totals['silent']}")
    print(f"hangs (> {TIMEOUT_S} s): {totals['hang']}")
    print(f"finished outputs lost: {totals['lost']}")
    sys.exit(0 if totals["traceback"] + totals["silent"] + totals["hang"] + totals["lost"] == 0 else 1)


if __name__ == "__main__":
    main()
