"""The sampling kernel (aim_cfg_sample), old against new in one process: token-for-token agreement on many rows
and device time per step, then (optionally) the GPU tests, an ncu profile and compute-sanitizer.

    git show 3141345:plugins/aim_kernels.cu > old_aim_kernels.cu     # the kernel before this rewrite
    PYTHONPATH=. python scripts/sampler_bench.py --out results/ --old-source old_aim_kernels.cu --all
    (a sampler of 0e5137b or later needs --old-smem 57344: the dynamic shared memory it was launched with)

Timing: a CUDA graph of --reps back-to-back (cfg_sample, advance) pairs, as the decode step launches them (the
advance is the kernel's own for this source's kernels, also timed with an aim_advance launch; and cfg_sample
alone), bf16 logits, vocabulary 16384, next input d 768 (1536 in the "d 1536" cases); the median of 7 replays,
per pair.
Writes sampler_bench.json and sampler_bench.txt under --out (and pytest/ncu/sanitizer logs with --all).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_sampling_kernel import KINDS, SETTINGS, fixed_point_draw, random_logits, run_sampler  # noqa: E402

from aim_rt.bench import replay_us  # noqa: E402
from aim_rt.plugins.kernels import (Kernels, SampleParams, _check, compile_async, compile_cubin,  # noqa: E402
                                    kernel_arch, kernel_builds, pdl_attributes)
from aim_rt.sampling import SamplingSettings, draw  # noqa: E402

T0 = time.time()
LOG: list[str] = []


def log(*args) -> None:
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    LOG.append(line)


class OldSampler:
    """aim_cfg_sample compiled from another source file (an earlier version), launched as it was: 1024 threads
    and `smem` bytes of dynamic shared memory."""

    _launch = Kernels._launch

    def __init__(self, dtype: str, source: Path, smem: int = 256 * 8):
        from cuda.bindings import driver

        major, minor = torch.cuda.get_device_capability()
        self.driver = driver
        cubin = compile_cubin(dtype, kernel_arch(major, minor), source_path=source)
        self.module = _check(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
        self.fn = {"aim_cfg_sample": _check(driver.cuModuleGetFunction(self.module, b"aim_cfg_sample"), "fn")}
        self.smem = smem
        if smem > 48 * 1024:
            attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _check(driver.cuFuncSetAttribute(self.fn["aim_cfg_sample"], attr, smem), "cuFuncSetAttribute")
        self._pdl_attrs = pdl_attributes(major)
        self.pdl = bool(self._pdl_attrs)

    def cfg_sample(self, p: SampleParams, stream: int) -> None:
        self._launch("aim_cfg_sample", (p.batch, 1, 1), 1024, self.smem, stream, p)


EXTRA: dict = {}  # name -> (source, smem): earlier versions to compare (--extra)
OLD_SMEM = [256 * 8]  # dynamic shared memory of --old-source (--old-smem)


def variants(dtype: str, old_source: Path | None) -> dict:
    out = {"new": Kernels(dtype)}
    if dtype == "bfloat16":
        out["new512"] = Kernels(dtype, defines={"SAMPLE_THREADS": 512})
    for name, (source, smem) in EXTRA.items():
        out[name] = OldSampler(dtype, source, smem)
    if old_source is not None:
        out["old"] = OldSampler(dtype, old_source, OLD_SMEM[0])
    return out


def agreement(old_source: Path | None, report: dict) -> None:
    """Every variant on the same rows: tokens, mixed logits and next input vs the old kernel and the
    fixed-point rule; tokens vs aim_rt.sampling.draw."""
    res = report.setdefault("agreement", {})
    for dtype in ("bfloat16", "float16", "float32"):
        kern = variants(dtype, old_source)
        tdt = getattr(torch, dtype)
        for vocab in (16384, 1000, 37):
            g = torch.Generator(device="cuda").manual_seed(vocab + len(dtype))
            batch = 32
            seeds = torch.arange(batch, device="cuda") * 7919 + 3
            stats = {name: {"rows": 0, "vs_fixed_point": 0, "vs_old": 0, "mixed_vs_old": 0, "next_vs_old": 0,
                            "vs_draw_agree": 0, "vs_draw_rows": 0} for name in kern}
            for si, settings in enumerate(SETTINGS):
                for ki, kind in enumerate(KINDS):
                    for rep in range(2 if vocab == 16384 else 1):
                        logits = random_logits(kind, 2 * batch, vocab, g)
                        if dtype == "float16":
                            logits = logits.clamp(-6e4, 6e4)
                        logits = logits.to(tdt)
                        step = 11 * si + 3 * ki + rep
                        outs = {name: run_sampler(k, logits, seeds, step, settings, d=64) for name, k in kern.items()}
                        base = outs.get("old", outs["new"])
                        want = fixed_point_draw(outs["new"][1], seeds, step, settings.top_k, settings.top_p)
                        for name, (tok, mixed, emb) in outs.items():
                            s = stats[name]
                            s["rows"] += batch
                            s["vs_fixed_point"] += int((tok != want).sum())
                            s["vs_old"] += int((tok != base[0]).sum())
                            s["mixed_vs_old"] += int((mixed.view(torch.int32) != base[1].view(torch.int32)).sum())
                            s["next_vs_old"] += int((emb["next_input"] != base[2]["next_input"]).sum())
                        if kind in ("normal", "gumbel"):
                            ref = draw(outs["new"][1].cpu(), seeds.cpu(), step, settings)
                            stats["new"]["vs_draw_agree"] += int((outs["new"][0].cpu() == ref).sum())
                            stats["new"]["vs_draw_rows"] += batch
            res[f"{dtype} vocab {vocab}"] = stats
            log(f"agreement {dtype} vocab {vocab}: " + "; ".join(
                f"{n}: rows {s['rows']}, != fixed-point {s['vs_fixed_point']}, != old {s['vs_old']}, mixed != old "
                f"{s['mixed_vs_old']}, next_input != old {s['next_vs_old']}, = draw {s['vs_draw_agree']}/"
                f"{s['vs_draw_rows']}" for n, s in stats.items()))


def time_graph(kern, advance_kern, batch: int, settings: SamplingSettings, kind: str, reps: int,
               with_advance: bool = True, scale: float = 1.0, own_advance: bool | None = None, d: int = 768) -> float:
    """µs per (sample, advance) pair: the advance is the kernel's own (SampleParams.advance, per-image token
    indices) for kernels of this source (own_advance None) and an aim_advance launch for older ones. d: the
    next input's width (768 AiM-B, 1536 AiM-XL)."""
    vocab = 16384
    own = isinstance(kern, Kernels) if own_advance is None else own_advance
    g = torch.Generator(device="cuda").manual_seed(batch)
    logits = (scale * random_logits(kind, 2 * batch, vocab, g)).to(torch.bfloat16)
    seeds = torch.arange(batch, device="cuda")
    step = torch.zeros(batch, device="cuda", dtype=torch.int32)
    tokens = torch.zeros(batch, reps + 1, device="cuda", dtype=torch.long)
    word = torch.randn(vocab, d, device="cuda").to(torch.bfloat16)
    pos = torch.randn(reps + 2, d, device="cuda").to(torch.bfloat16)
    nxt = torch.zeros(2 * batch, d, device="cuda", dtype=torch.bfloat16)
    p = SampleParams(logits=logits.data_ptr(), logits_stride=logits.stride(0), batch=batch, vocab=vocab,
                     uncond_rows=batch, cfg_scale=settings.cfg_scale, temperature=settings.temperature,
                     top_k=settings.top_k, top_p=settings.top_p, seeds=seeds.data_ptr(), step=step.data_ptr(),
                     position_offset=1, tokens=tokens.data_ptr(), num_tokens=reps + 1, teacher=None,
                     mixed_out=None, word_emb=word.data_ptr(), pos_emb=pos.data_ptr(), d=d,
                     next_input=nxt.data_ptr(), next_token=None, advance=int(with_advance and own))

    def launch():
        s = torch.cuda.current_stream().cuda_stream
        kern.cfg_sample(p, s)
        if with_advance and not own:
            advance_kern.advance(step.data_ptr(), s)

    for _ in range(3):
        launch()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            launch()
    return replay_us(graph, reps, replays=7, before=step.zero_)


def timing(old_source: Path | None, reps: int, report: dict) -> None:
    kern = variants("bfloat16", old_source)
    res = report.setdefault("timing_us", {})
    official = SamplingSettings()
    cases = [("official", official, kind, batch, 1.0) for kind in ("normal", "gumbel") for batch in (1, 16, 64)]
    # flat rows: normal logits x 0.2 (mixed logits' spread ~4, as a random-weight AiM's): the top-p cut falls
    # among many entries of similar weight
    cases += [("official, flat", official, "normal", batch, 0.2) for batch in (1, 16, 64)]
    # AiM-XL's next input (d 1536: two elements per thread), flat rows as its random weights give
    cases += [("official, flat, d 1536", official, "normal", batch, 0.2) for batch in (1, 16)]
    cases += [("top_k 0 / top_p 0.9", SamplingSettings(top_k=0, top_p=0.9), "normal", 16, 1.0),
              ("top_k 50 / top_p 1", SamplingSettings(top_k=50, top_p=1.0), "normal", 16, 1.0),
              ("official, ties", official, "ties", 16, 1.0),
              ("official, temperature 0.8", SamplingSettings(temperature=0.8), "normal", 16, 1.0)]
    for label, settings, kind, batch, scale in cases:
        row = {}
        for name, k in kern.items():
            d = 1536 if label.endswith("d 1536") else 768
            row[name] = round(time_graph(k, kern["new"], batch, settings, kind, reps, scale=scale, d=d), 2)
            if label.startswith("official") and kind == "normal" and isinstance(k, Kernels):
                row[name + " (aim_advance)"] = round(time_graph(k, kern["new"], batch, settings, kind, reps,
                                                               scale=scale, own_advance=False), 2)
            if label == "official" and kind == "normal":
                row[name + " (no advance)"] = round(time_graph(k, kern["new"], batch, settings, kind, reps, False), 2)
        key = f"{label}, {kind} logits, batch {batch}"
        res[key] = row
        log(f"time {key}: " + ", ".join(f"{n} {v:.2f} µs" for n, v in row.items()))


def ncu_launches(old_source: Path | None) -> None:
    """Target of ncu: each variant once at batch 1 and 16 (official settings, normal bf16 logits)."""
    kern = variants("bfloat16", old_source)
    for batch in (1, 16):
        g = torch.Generator(device="cuda").manual_seed(batch)
        logits = random_logits("normal", 2 * batch, 16384, g).to(torch.bfloat16)
        seeds = torch.arange(batch, device="cuda")
        for name in kern:
            if name in ("old", "new"):
                run_sampler(kern[name], logits, seeds, 1, SamplingSettings(), d=768)
                print(f"ncu launch: {name} batch {batch}", flush=True)


def sanitize_launches() -> None:
    """Target of compute-sanitizer: the paths of the new kernel (warp resolve, refine, long list, no top-k)."""
    kern = Kernels("bfloat16")
    g = torch.Generator(device="cuda").manual_seed(3)
    seeds = torch.arange(2, device="cuda")
    for vocab, kind, settings in ((16384, "normal", SamplingSettings()), (16384, "ties", SamplingSettings()),
                                  (16384, "flat", SamplingSettings(top_k=5000, top_p=0.5)),
                                  (16384, "normal", SamplingSettings(top_k=0, top_p=0.9)), (37, "normal", SamplingSettings())):
        logits = random_logits(kind, 4, vocab, g).to(torch.bfloat16)
        tok, mixed, _ = run_sampler(kern, logits, seeds, 1, settings, d=64)
        ok = torch.equal(tok, fixed_point_draw(mixed, seeds, 1, settings.top_k, settings.top_p))
        print(f"sanitize launch vocab {vocab} {kind} {settings.top_k}/{settings.top_p}: matches {ok}", flush=True)


def precompile(old_source: Path | None) -> None:
    """Every cubin this script (and the kernel tests) will load, compiled at once into the disk cache: the
    programs of each Kernels (kernel_builds) and the sources OldSampler compiles as they are."""
    major, minor = torch.cuda.get_device_capability()
    arch = kernel_arch(major, minor)
    builds = [b for dt in ("bfloat16", "float16", "float32") for b in kernel_builds(dt, arch)]
    builds += kernel_builds("bfloat16", arch, {"SAMPLE_THREADS": 512})
    olds = [old_source] if old_source is not None else []
    builds += [compile_async(dt, arch, {}, src) for dt in ("bfloat16", "float16", "float32")
               for src in olds + [src for src, _ in EXTRA.values()]]
    t = time.time()
    for b in builds:
        b.result()
    log(f"precompile: {len(builds)} cubins in {time.time() - t:.0f} s")


def tool(cmd: list[str], out: Path, budget: float) -> None:
    left = budget - (time.time() - T0)
    if left < 10:
        log(f"skipped (time): {' '.join(cmd[:3])}")
        return
    t = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=left - 3, cwd=ROOT)
        out.write_text(r.stdout + "\n--- stderr ---\n" + r.stderr[-20000:])
        log(f"{out.name}: exit {r.returncode} in {time.time() - t:.0f} s")
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        out.write_text(f"timed out after {left - 3:.0f} s\n{text}")
        log(f"{out.name}: timed out")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--old-source", type=Path, default=None)
    ap.add_argument("--old-smem", type=int, default=256 * 8,
                    help="dynamic shared memory bytes of --old-source (57344 for the sampler of 0e5137b)")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--extra", action="append", default=[], help="NAME=SOURCE:SMEM, another version to compare")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds for the whole run (later parts skip)")
    ap.add_argument("--all", action="store_true", help="also pytest, ncu and compute-sanitizer (subprocesses)")
    ap.add_argument("--ncu-target", action="store_true")
    ap.add_argument("--sanitize-target", action="store_true")
    ap.add_argument("--precompile", action="store_true", help="first compile every cubin, all at once")
    a = ap.parse_args()
    OLD_SMEM[0] = a.old_smem
    for spec in a.extra:
        name, rest = spec.split("=", 1)
        source, smem = rest.rsplit(":", 1)
        EXTRA[name] = (Path(source), int(smem))
    if a.ncu_target:
        return ncu_launches(a.old_source)
    if a.sanitize_target:
        return sanitize_launches()
    a.out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "reps": a.reps,
              "torch": torch.__version__}
    log(report["device"], report["date"])

    def save():
        (a.out / "sampler_bench.json").write_text(json.dumps(report, indent=2))
        (a.out / "sampler_bench.txt").write_text("\n".join(LOG) + "\n")

    if a.precompile:
        precompile(a.old_source)
    for part in (lambda: timing(a.old_source, a.reps, report), lambda: agreement(a.old_source, report)):
        try:
            part()
        except Exception as e:  # keep what the other parts show
            import traceback

            log("FAILED:", repr(e), traceback.format_exc())
        save()
    if a.all:
        py = sys.executable
        me = [py, str(Path(__file__).resolve())] + (["--old-source", str(a.old_source)] if a.old_source else [])
        me += [f"--old-smem={a.old_smem}"]
        me += [f"--extra={e}" for e in a.extra]
        ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
        tool([ncu, "--set", "full", "--kernel-name", "aim_cfg_sample", *me, "--ncu-target"], a.out / "ncu.txt",
             a.budget * 0.55)
        tool([py, "-m", "pytest", "-q", "-x", "tests/test_sampling_kernel.py",
              "tests/test_cuda_backend.py::test_sampling_kernel_matches_reference_draw",
              "tests/test_cuda_backend.py::test_teacher_forced_logits_over_all_steps_and_token_agreement",
              "tests/test_cuda_backend.py::test_bf16_image_does_not_depend_on_batch_composition"],
             a.out / "pytest.txt", a.budget * 0.82)
        cs = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
        for t in ("racecheck", "memcheck"):
            tool([cs, "--tool", t, py, str(Path(__file__).resolve()), "--sanitize-target"],
                 a.out / f"sanitizer_{t}.txt", a.budget)
        save()


if __name__ == "__main__":
    main()
