"""Compile aim_kernels.cu with NVRTC (cuda-python), cache the cubin on disk, and launch its entry points.

The ctypes structs below mirror the C structs of aim_kernels.cu field for field; the TensorRT plugin fills the
same structs. Compilation needs only NVRTC (no GPU): CI compiles for sm_80 and sm_90.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

SOURCE = Path(__file__).with_name("aim_kernels.cu")
ELEM_KINDS = {"float32": 0, "float16": 1, "bfloat16": 2}


class KernelError(RuntimeError):
    pass


def _check(result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise KernelError(f"{what} failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def cache_dir() -> Path:
    return Path(os.environ.get("AIM_RT_CACHE", Path.home() / ".cache" / "aim-rt")) / "kernels"


def compile_cubin(dtype: str, arch: str, use_cache: bool = True, check_layout: bool = False,
                  defines: dict | None = None, source_path: Path = SOURCE) -> bytes:
    """NVRTC-compile a kernel source (aim_kernels.cu, or vq_kernels.cu) for one element type and one architecture
    ('sm_90'), with extra -D `defines`; cached on disk by content. check_layout appends layout_asserts() (the
    tests and CI do; it needs an NVRTC with __builtin_offsetof)."""
    from cuda.bindings import nvrtc

    if dtype not in ELEM_KINDS:
        raise KernelError(f"kernels support {sorted(ELEM_KINDS)}, not {dtype!r}")
    source = source_path.read_bytes() + (layout_asserts().encode() if check_layout else b"")
    options = [f"--gpu-architecture={arch}", f"-DELEM_KIND={ELEM_KINDS[dtype]}", "--std=c++17", "-lineinfo",
               *(f"-D{k}={v}" for k, v in sorted((defines or {}).items()))]
    version = _check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    key = hashlib.sha256(source + repr((options, version)).encode()).hexdigest()[:24]
    path = cache_dir() / f"{source_path.stem}-{dtype}-{arch}-{key}.cubin"
    if use_cache and path.is_file():
        return path.read_bytes()
    prog = _check(nvrtc.nvrtcCreateProgram(source, source_path.name.encode(), 0, [], []), "nvrtcCreateProgram")
    opts = [o.encode() for o in options]
    result = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
    # Buffers handed to C must be mutable and ours: `b" " * 1` is CPython's shared one-byte object, and NVRTC
    # writing its NUL there turned every b" " in the process into b"\x00".
    log = bytearray(size)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if int(result[0]) != 0:
        text = bytes(log).rstrip(b"\0").decode(errors="replace")
        raise KernelError(f"NVRTC could not compile {source_path.name} for {arch}/{dtype}:\n{text}")
    size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
    buf = bytearray(size)
    _check(nvrtc.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
    cubin = bytes(buf)
    nvrtc.nvrtcDestroyProgram(prog)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_bytes(cubin)
        os.replace(tmp, path)
    return cubin


_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="aim-rt-nvrtc")
_BUILDS: dict[tuple, Future] = {}
_BUILDS_LOCK = threading.Lock()


def compile_async(dtype: str, arch: str, defines: dict | None = None, source_path: Path = SOURCE) -> Future:
    """compile_cubin (cached on disk) in a background thread: NVRTC releases the GIL, so programs compile side by
    side, and with the rest of a cold start (building the model). One compile per distinct build in a process:
    a second request for it waits for the first. Returns a Future of the cubin."""
    key = (dtype, arch, tuple(sorted((k, str(v)) for k, v in (defines or {}).items())), str(source_path))
    with _BUILDS_LOCK:
        fut = _BUILDS.get(key)
        if fut is None or (fut.done() and fut.exception() is not None):  # a failed build is tried again
            fut = _BUILDS[key] = _POOL.submit(compile_cubin, dtype, arch, True, False, defines, source_path)
    return fut


PDL_EARLY_ANY = 1 << 30  # a PDL_EARLY_<KIND> limit no row count reaches: that kind lets its successor launch at once
# Defines that only the host reads (from the step program's build): which kernel runs which rows, k splits
HOST_DEFINES = frozenset({"SSU_WARP_ROWS", "GEMM_MIN_ROWS", "GEMM_MAX_ROWS", "GEMM_FOLD_MAX_ROWS", "GEMM_CTAS",
                          "GEMM_FOLD_CTAS", "GEMV_NARROW_ROWS", "RESID_M1_ROWS", "FOLD_ROWS",
                          "NORM_FOLD_ROWS"})


def model_defines(d_model: int) -> dict:
    """The step program's -D for a model of this width, as measured in whole decode steps on the H200 (each
    variant twice, alternating, in one process):
    - NORM_PER_ONLY, only the residual norm's instance for this width (bench/results/{lean,mt,mt2,mt3,mt4}_h200_
      2026-11-29_*). The kernel holds the registers of its widest instance (79 for all four; 46 / 48 / 63 for
      AiM-B / L / XL's alone). Per step: AiM-B -4 % at batch 1, -0.6 % at 4, -1.8 % at 16, -1.3 % at 64; AiM-L
      -2.4 % at 1 and -2 % at 4; AiM-XL even.
    - Below d_model 1024: the residual norms and the products let their successors launch at once at every batch
      (PDL_EARLY_NORM / PDL_EARLY_GEMV; the state update keeps PDL_EARLY_ROWS), so in_proj fetches its weights
      during the norm and the state update its first slices during in_proj (bench/results/early_steps_h200_
      2026-12-02.*): AiM-B -3.7 % per step at batch 16, even at 1 and 64. Not for AiM-XL: +6 % at batch 16
      (products alone early: even).
    - aim_gemm's rows on Hopper (GEMM_MIN_ROWS / GEMM_MAX_ROWS; bench/results/gemm_*_h200_2026-12-03.*, against
      aim_gemv below 33 rows and cuBLAS above): AiM-B 33-128 (-14 % per step at batch 17, -16 % at 24, -12 % at
      32, -3 % at 48, -2 % at 64; from 9 rows +10 to +38 % at batch 6-16); AiM-L 33-64 (-10 % at 24, -7 % at 32;
      +2 % at 16, -0.9 % at 48, +1.2 % at 64); AiM-XL 32-64 (-5 % at batch 16, even at 12, +2 % at 10; -1 % at
      24; +2 to +3 % at 40-64). With aim_gemm_m2 for up to 32 rows (2026-12-03, gemm_m2_h200_2026-12-03.* and
      gemm_min17_h200_2026-12-03.*, against aim_gemv): AiM-XL from 17 rows (-5 / -3.5 / -6.7 % at batch 9 / 10 / 12,
      and -4.0 % at 16 against m4), AiM-L from 24 (-1.0 / -3.8 % at batch 12 / 16; +4.8 / +1.2 / +1.6 % at 9 / 10 /
      11, gemm_l_boundary_h200_2026-12-03.*); AiM-B stays on aim_gemv below 33 rows (m2 +8 % at batch 12, +2 %
      at 16). Since m2 runs 8 stages and folds (2026-12-04, gemm9_h200_2026-12-04.* and gemm_min_h200_2026-12-04.*,
      whole steps against the rule before): AiM-XL from 3 rows, batch 2 / 4 / 5 / 6 / 7 / 8 -2.1 / -2.9 / -2.5 /
      -5.0 / -5.8 / -9.1 % (from 1 row: even at batch 1, so batch 1 keeps aim_gemv); AiM-L stays at 24 (from 9
      rows +14 % at batch 5 and 8, from 17 +1.5 % at 10; AiM-B's m2 +2 to +13 %, gemm_m2_b_h200_2026-12-04.*).
    - From d_model 1024, aim_gemv's wide column tiles (GEMV_WIDE) from 9 rows instead of 17 (GEMV_NARROW_ROWS 8,
      a define only the host reads; the one-m-tile instances then serve up to 8 rows), measured in whole steps
      against the one-tile blocks, alternating in one process, tokens identical (scripts/wide_tiles_bench.py,
      bench/results/wide_tiles_h200_2026-12-03*.json): AiM-XL batch 5 / 6 / 7 / 8 even / -2.9 / -7.5 / -4.9 %
      (and -5.4 % at 8 in a second run), AiM-L 6 / 8 -3.1 / -4.1 %; from one row they were even or worse at batch
      1, 3 and 4 (AiM-L b1 +3.8 %, AiM-XL b4 +1.1 / +1.4 %) and AiM-B's lost 0.4-1.1 % at batch 1-8. This rule
      against the one before, once more (wide_tiles_rule_h200_2026-12-03.json): AiM-XL b5-8 -0.1 / -4.2 / -8.0 /
      -6.4 %, AiM-L b5 / 6 / 8 -6.1 / -3.0 / -4.0 %.
    - Below d_model 1024, out_proj with the residual add folded in (aim_gemv_resid_*) runs its one-m-tile
      instance up to 2 rows (RESID_M1_ROWS, a define only the host reads; wider models follow their gemv_m1
      choice), against the four-m-tile one (bench/results/resid_m1_h200_2026-12-03.*, up to 16 rows, whole
      steps, tokens identical): AiM-B batch 1 -6.2 %, batch 2 even, batch 4 +0.6 %.
    - Below d_model 1024, out_proj folded up to 32 rows (FOLD_ROWS, a define only the host reads; 16 by default),
      17-32 in its wide-tile instance: AiM-B batch 12 / 16 -2.7 / -1.0 % per step against the unfolded step,
      tokens identical (bench/results/fold32_h200_2026-12-03.*; an earlier run, fold3_*, read batch 16 even).
      On one-tile blocks it was slower (+4.4 / +6.4 %). Wider models' 17-32 rows are aim_gemm's (AiM-L from
      24), whose 32-row instance does not fold (FOLD_GEMM).
    - aim_gemm's pipeline depth (GEMM_STAGES_M<mt>, 4 stages by default; bench/results/gemm_stages{,2}_h200_
      2026-12-04.*, whole steps, tokens identical): from d_model 1536 8 stages for up to 32 rows (AiM-XL batch
      12 / 16 -6.0 / -5.2 %; 6 stages -3.8 % at 16, 9 worse than 8), from 1024 6 stages for 33-64 rows (AiM-XL
      batch 24 / 32 -2.9 / -2.1 to -2.6 %, AiM-L 24 / 32 -0.7 / -0.9 to -1.1 %). Not AiM-L's 32 rows (8 stages
      +2.0 % at batch 16) nor AiM-B's (6 stages +2.7 % at batch 24, 5 for 128 rows +7 % at 64): more shared
      memory per CTA leaves fewer CTAs resident beside the kernel before them.
    - From d_model 1536, out_proj's 17-32 rows folded too (FOLD_GEMM_M2: aim_gemm_resid_m2), which lost at 4
      stages (AiM-XL b16 +1.1 %) and wins at 8 (bench/results/gemm_fold2_h200_2026-12-04.*, whole steps against
      the m4-only fold, tokens identical): AiM-XL batch 12 / 16 -3.6 / -4.2 %. Not AiM-L's (4 stages: +3.7 % at
      batch 16 in the same run; at 8 stages, gemm_m2_b_h200_2026-12-04.*: even at 12 and 16).
    - From d_model 1024, the folded out_proj runs aim_gemm_resid_m8 for 65-128 rows (GEMM_FOLD_MAX_ROWS, a
      define only the host reads, and FOLD_GEMM_M8) while in_proj and lm_head stay on cuBLAS there
      (bench/results/gemm_foldmax_h200_2026-12-04.*, whole steps, tokens differ only by the sums' order): AiM-XL
      batch 33 / 48 / 64 -6.6 / -5.1 / -3.7 %, AiM-L -6.6 / -5.8 / -3.1 %; all three products on aim_gemm
      (gemm_max128_h200_2026-12-04.*) gained less (in_proj and lm_head alone +70 % on m8). AiM-B, whose
      products run aim_gemm up to 128 rows already, gained 0.6 % at batch 48 and nothing at 64 from folding m8
      then (on wgmma since: -1.0 % at 64, below).
    - The state update's warp kernel (aim_ssu_warps, every warp its own slices, no barrier per slice) from
      SSU_WARP_ROWS rows (a define only the host reads), the block kernel below (bench/results/ssw2_h200_
      2026-12-04.*, whole steps, tokens identical: the two kernels write the same bits): AiM-B from 96 rows,
      batch 48 / 64 -1.7 / -3.8 % (batch 24 / 32 +16 / +9 %); AiM-XL from 64, batch 32 / 48 / 64 -2.5 / -3.1 /
      -5.5 % (batch 16 / 24 +8 / +0.8 %); AiM-L from 64 too, batch 32 / 48 / 64 -1.4 / -3.1 / -2.9 % (batch 24
      +3.8 %; ssw_l_h200_2026-12-04.*). Without a width, from 128 rows (SSU_WARP_ROWS here).
    - Below d_model 1024, in_proj norms its own x after the first layer wherever it is an aim_gemv (up to 32
      rows, NORM_FOLD_ROWS, a define only the host reads; GemvNormParams in aim_kernels.cu), so the step has
      one norm kernel per layer less (AiM-B: 76 kernels instead of 99). Measured on an H100 (no H200 came that
      day; bench/results/normfold4_h100_2026-12-05.*, whole steps, 3 rounds alternating, medians): AiM-B
      batch 1 / 2 / 4 / 8 / 16 -5.3 / -1.5 / -4.2 / -3.7 / +0.5 %. All of aim_gemv's rows or none: an image's
      bits then stay the same from batch 1 to 16. Not AiM-XL (batch 1, its only aim_gemv in_proj: -0.2 %; its
      normed in_proj alone 9.2 against 7.95 us, four blocks per SM instead of five), nor AiM-L (not measured).
    - From d_model 1536, in_proj norms its own x on aim_gemm's rows too (GEMM_NORM: aim_gemm_norm_m<MT> for the
      MTs of the model's aim_gemm rows, gemm_norm_mask; the folded aim_gemm out_proj hands x * gm and the tile
      sums on). Measured on an H100 (bench/results/gemmnorm_h100_2026-12-06.*, whole steps, 2 rounds
      alternating): AiM-XL batch 2 / 8 / 16 / 32 -0.6 / -4.6 / -2.0 / -0.2 %; AiM-B batch 17 / 32 +2.5 / +5.4 %
      (its W shift, float32 per row, is 16 % of in_proj's weight bytes at 64 rows, 4 % at AiM-XL's 32), so not
      below 1536 (GEMM_NORM_ON; AIM_RT_GEMM_NORM=0 turns it off). `aim-rt bench` on an H100, AiM-XL batch 16
      AR 525.4 against 535.7 ms (bench_xl_{gemmnorm,nogemmnorm}_h100_2026-12-06.json); against the float32
      model at batch 8 max rel 6.1e-2 against 6.5e-2 without, draws 55.3 against 55.1 % agreement.
    - At d_model 1024 (AiM-L) the same on aim_gemm's 24-32 rows only (GEMM_NORM=2: aim_gemm_norm_m2), with the
      32-row out_proj folded to hand x * gm on (FOLD_GEMM_M2). Measured on an H100 (bench/results/gnl{,2}_h100_
      2026-12-06.*, whole steps, 2 rounds alternating): batch 12 / 16 -4.0 / -2.4 % (the fold alone +1.0 / +3.2 %);
      on 33-64 rows (m4) +2.1 / +3.0 % at batch 24 / 32, so not there.
    - Since aim_gemm runs on wgmma (GEMM_WGMMA, sm_90a; 2026-12-06, seventh session, on an H100: bench/results/
      wg{,3}_h100_2026-12-06.*, whole steps, 2 rounds alternating, tokens identical): AiM-B's 128-row out_proj
      folds too (FOLD_GEMM_M8; batch 64 -1.0 %, batch 24 / 32 even), and AiM-L's in_proj (and lm_head) run
      aim_gemm up to 128 rows instead of cuBLAS past 64 (GEMM_MAX_ROWS; batch 64 -4.3 %). AiM-XL's stay on
      cuBLAS past 64 rows (128: even at batch 48, +2.1 % at 64); AiM-B's normed aim_gemm still loses (batch 32 /
      64 +4.0 / +3.5 %)."""
    defines = {"NORM_PER_ONLY": norm_instance(d_model)}
    if d_model < 1024:
        defines.update(PDL_EARLY_NORM=PDL_EARLY_ANY, PDL_EARLY_GEMV=PDL_EARLY_ANY, RESID_M1_ROWS=2, FOLD_ROWS=32)
    else:
        defines.update(GEMM_MIN_ROWS=3 if d_model >= 1536 else 24, GEMM_MAX_ROWS=64, GEMV_NARROW_ROWS=8,
                       GEMM_STAGES_M4=6, GEMM_FOLD_MAX_ROWS=128, FOLD_GEMM_M8=1)
        if d_model >= 1536:
            defines.update(GEMM_STAGES_M2=8, FOLD_GEMM_M2=1)
        else:  # AiM-L: its 24-32 rows folded and normed (m2), not its 33-64; in_proj on aim_gemm up to 128 rows
            defines.update(FOLD_GEMM_M2=1, GEMM_NORM=2, GEMM_MAX_ROWS=128)
    defines.update(SSU_WARP_ROWS=96 if d_model < 1024 else 64)
    if d_model < 1024:
        defines.update(NORM_FOLD_ROWS=32, GEMM_NORM=0, FOLD_GEMM_M8=1)
    return defines


def gemv_m1_chunks(d_model: int, chunks) -> list[int]:
    """The depths (CH = k / 256) whose products of up to 16 rows a model of this width runs through the
    one-m-tile instances (Y in aim_kernels.cu: 12 KB less shared memory, ~10 registers fewer than X(CH, 1)).
    Measured choices (whole decode steps against 1e5ce15, alternating in one process, H200,
    bench/results/mt4_h200_2026-11-29_*; at 7221f6d, whose GEMV_NARROW_MT builds ran the same kernels):
    - AiM-B (768): none. One m-tile cost +5 % per step at batch 1 and +4 % at 4.
    - AiM-L (1024): the depths with wide instances (in_proj, lm_head): -10.7 % at batch 1, -6.3 % at 4, even
      at 16. Its out_proj (2048) too made batch 1 worse (716 against 673 us) and batch 4 better (810 / 844).
    - AiM-XL (1536) and wider: every depth: -7.6 % at batch 1, -5.5 % at 4, even at 16.
    (Smaller kernels let more of the following kernels take their places early under programmatic dependent
    launch; which way that goes depends on the model, hence per-width measured choices.)"""
    if d_model < 1024:
        return []
    return [c for c in chunks if c in GEMV_CHUNKS and (d_model >= 1536 or c in GEMV_WIDE)]


def resid_chunk(d_model: int, chunks) -> int | None:
    """The depth (CH) of out_proj, the product a model of this width runs with the residual add folded in
    (aim_gemv_resid_*, GemvFoldParams in aim_kernels.cu): its depth other than d_model (d_inner); None if
    there is none."""
    others = [c for c in chunks if c * 256 != d_model and c in GEMV_CHUNKS]
    return others[-1] if others else None


def norm_instance(d: int) -> int:
    """The residual norm's instance (elements per thread) for rows of width d."""
    per = -(-d // NORM_THREADS)
    for k in NORM_INSTANCES:
        if per <= k:
            return k
    raise KernelError(f"aim_residual_norm handles d_model up to {NORM_THREADS * NORM_PER}, not {d}")


# Whether a model's build has in_proj norm its own x on aim_gemm's rows where model_defines does not decide (from
# d_model 1536). AIM_RT_GEMM_NORM=0 / 1 overrides every model's choice: none / all of its aim_gemm rows.
GEMM_NORM_ON = True


def gemm_norm_mask(step: dict) -> int:
    """GEMM_NORM for a model's build `step` (its -D): the bits of the aim_gemm instances (MT 2, 4, 8) that its
    in_proj runs on aim_gemm's rows (GEMM_MIN_ROWS to GEMM_MAX_ROWS), so that a cold start compiles no other."""
    lo, hi = int(step.get("GEMM_MIN_ROWS", GEMM_ROWS[0])), min(int(step.get("GEMM_MAX_ROWS", GEMM_ROWS[1])),
                                                              GEMM_MAX_ROWS)
    available = (2, 4, 8) if int(step.get("GEMM_M2", 1)) else (4, 8)
    return sum({gemm_mt(rows, available) for rows in range(lo, hi + 1)})


def step_builds(dtype: str, defines: dict | None = None, gemv_depths: tuple[int, ...] | None = None,
                d_model: int | None = None) -> list[dict]:
    """The -D sets of the programs a Kernels compiles: the step's kernels with only the aim_gemv instances the
    depths need (all of them for gemv_depths None) and, for a model's `d_model`, the build measured best for
    that width (model_defines); then the sampler and the state update's warp kernel (AIM_PARTS in
    aim_kernels.cu), which take only the explicit defines: they are the same for every model, so precompile_early
    starts them before the model is known (the warp kernel in its own program: the step's would compile ~20 %
    longer with it, on a cold start's path)."""
    defines = dict(defines or {})
    if "AIM_RT_PDL_EARLY_ROWS" in os.environ:  # to measure: up to how many rows the next kernel launches at once
        defines.setdefault("PDL_EARLY_ROWS", int(os.environ["AIM_RT_PDL_EARLY_ROWS"]))
    if "AIM_RT_NORM_FOLD" in os.environ:  # up to how many rows in_proj norms its own x (0: never; see NORM_FOLD_ROWS)
        defines.setdefault("NORM_FOLD_ROWS", int(os.environ["AIM_RT_NORM_FOLD"]))
        if defines["NORM_FOLD_ROWS"] == 0:  # nor on aim_gemm's rows
            defines.setdefault("GEMM_NORM", 0)
    step = dict(defines)
    if d_model is not None:
        per_model = model_defines(d_model)
        if "PDL_EARLY_ROWS" in step:  # one launch order asked for (to measure): no per-kind limits over it
            per_model = {k: v for k, v in per_model.items() if not k.startswith("PDL_EARLY_")}
        step = {**per_model, **step}  # explicit defines win
    # aim_gemm's depths always passed, so that the host sizes shared memory by what was compiled
    step = {**{f"GEMM_STAGES_M{mt}": n for mt, n in GEMM_STAGES.items()}, **step}
    env = os.environ.get("AIM_RT_GEMM_NORM")  # the normed in_proj's instances on aim_gemm's rows
    if d_model is not None and "GEMM_NORM" not in defines and (env is not None or "GEMM_NORM" not in step):
        on = (env or ("1" if GEMM_NORM_ON else "0")) == "1"
        step["GEMM_NORM"] = gemm_norm_mask(step) if on else 0
    if gemv_depths is not None:
        chunks = sorted({k // 256 for k in gemv_depths})
        inst = [f"X({c},{t})" for c, t in _gemv_pairs() if c in chunks]
        if d_model is not None:
            inst += [f"Y({c})" for c in gemv_m1_chunks(d_model, chunks)]
            if (c_out := resid_chunk(d_model, chunks)) is not None:  # out_proj with the residual add folded in,
                narrow = int(step.get("GEMV_NARROW_ROWS", GEMV_NARROW_ROWS))  # in the tiles it has up to FOLD_ROWS
                most = int(step.get("FOLD_ROWS", FOLD_ROWS))
                tiles = sorted({gemv_tiles(rows, 256 * c_out, narrow) for rows in (1, most) if rows <= most})
                inst += [f"XR({c_out},{t})" for t in tiles if (c_out, t) in _gemv_pairs()]
                if gemv_m1_chunks(d_model, [c_out]) or int(step.get("RESID_M1_ROWS", 0)):
                    inst.append(f"YR({c_out})")
            c_in = d_model // 256  # in_proj with the norm folded in, in the tiles it has up to NORM_FOLD_ROWS
            most = min(int(step.get("NORM_FOLD_ROWS", NORM_FOLD_ROWS)), int(step.get("FOLD_ROWS", FOLD_ROWS)))
            if most > 0 and c_in in chunks:
                narrow = int(step.get("GEMV_NARROW_ROWS", GEMV_NARROW_ROWS))
                tiles = sorted({gemv_tiles(rows, d_model, narrow) for rows in (1, most)})
                inst += [f"XN({c_in},{t})" for t in tiles if (c_in, t) in _gemv_pairs()]
                if c_in in gemv_m1_chunks(d_model, chunks):
                    inst.append(f"YN({c_in})")
        step["GEMV_INSTANCES"] = " ".join(inst) or "/* none */"
    # the other two programs without the defines only the host reads (they would only change their cache keys)
    shared = {k: v for k, v in defines.items() if k not in HOST_DEFINES}
    none = "/* none */"
    return [{**step, "AIM_PARTS": 1}, {**shared, "AIM_PARTS": 2, "GEMV_INSTANCES": none},
            {**shared, "AIM_PARTS": 4, "GEMV_INSTANCES": none}]


def kernel_builds(dtype: str, arch: str, defines: dict | None = None, gemv_depths: tuple[int, ...] | None = None,
                  source_path: Path = SOURCE, d_model: int | None = None) -> list[Future]:
    """The compiles a Kernels(dtype, defines=..., gemv_depths=..., source_path=..., d_model=...) loads, started
    (compile_async): Kernels waits for these; callers that know what they will build start them early
    (precompile, benchmarks)."""
    return [compile_async(dtype, arch, d, source_path) for d in step_builds(dtype, defines, gemv_depths, d_model)]


VQ_SOURCE = SOURCE.with_name("vq_kernels.cu")
VQ_DEFINES = {"VEC_BATCH": 4}  # the VQ decoder's default build (aim_rt/vq_fast.py)


def kernel_arch(major: int, minor: int) -> str:
    """The NVRTC target of a GPU of compute capability major.minor: 'sm_90a' on Hopper (its architecture-specific
    instructions: aim_gemm's wgmma), else 'sm_<major><minor>'. Every compile for a device goes through this, so
    that a precompiled program and the one loaded share their cache entry."""
    return "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


def device_arch(index: int = 0) -> str | None:
    """The NVRTC target (kernel_arch) of CUDA device `index`, through the driver API (torch is not needed, nor
    imported), or None where there is no usable GPU or no cuda-python."""
    try:
        from cuda.bindings import driver

        if int(driver.cuInit(0)[0]) != 0:
            return None
    except Exception:  # no cuda-python, or no driver library on this machine
        return None
    err, dev = driver.cuDeviceGet(index)
    if int(err) != 0:
        return None
    attr = driver.CUdevice_attribute
    major = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    minor = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    if int(major[0]) != 0 or int(minor[0]) != 0:
        return None
    return kernel_arch(major[1], minor[1])


def precompile_early(dtype: str, device_index: int = 0) -> None:
    """Start compiling the programs that depend on nothing but the element type and the GPU: the sampler, the
    state update's warp kernel, and the VQ decoder's kernels for 16-bit types. The CLI calls this first thing for
    --backend cuda, so NVRTC works while torch is imported and the checkpoint read (the step's program, which
    depends on the model's shapes, starts once the config is known: aim_rt.cuda_backend.precompile). Errors
    surface later, at the use."""
    arch = device_arch(device_index) if dtype in ELEM_KINDS else None
    if arch is None:
        return
    for build in step_builds(dtype)[1:]:  # the sampler, the warp state update
        compile_async(dtype, arch, build)
    if dtype != "float32":
        compile_async(dtype, arch, VQ_DEFINES, VQ_SOURCE)


def _gemv_pairs() -> list[tuple[int, int]]:
    return list(dict.fromkeys([(c, 1) for c in GEMV_CHUNKS] + list(GEMV_WIDE.items())))


# ----- parameter structs (mirror aim_kernels.cu; layout_asserts() makes NVRTC check that they agree) ------
P, LL, I, F = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_float


class SsuParams(ctypes.Structure):
    _fields_ = [
        ("xbc", P), ("xbc_stride", LL), ("z", P), ("z_stride", LL), ("dt", P), ("dt_stride", LL),
        ("conv_state_in", P), ("conv_state_out", P), ("ssm_state_in", P), ("ssm_state_out", P),
        ("conv_w", P), ("conv_b", P), ("dt_bias", P), ("A_log", P), ("D", P), ("norm_w", P),
        ("sumsq", P), ("y", P), ("y_stride", LL),
        ("rows", I), ("d_inner", I), ("conv_dim", I), ("nheads", I), ("headdim", I), ("d_state", I),
        ("ngroups", I), ("d_conv", I), ("eps", F),
    ]


class ConvShift(ctypes.Structure):
    _fields_ = [("xbc", P), ("xbc_stride", LL), ("state_in", P), ("state_out", P), ("first", I), ("count", I),
                ("conv_dim", I), ("width", I)]


class GatedNormParams(ctypes.Structure):
    _fields_ = [("y", P), ("y_stride", LL), ("sumsq", P), ("rows", I), ("d_inner", I), ("nheads", I),
                ("ngroups", I), ("eps", F), ("bc", ConvShift)]


class NormParams(ctypes.Structure):
    _fields_ = [
        ("input", P), ("input_stride", LL), ("gate", P), ("gate_stride", LL),
        ("sumsq", P), ("sumsq_heads", I), ("sumsq_count", I), ("bc", ConvShift), ("residual", P),
        ("norm_w", P), ("norm2_w", P), ("shift", P), ("scale", P), ("mod_stride", LL),
        ("out", P), ("out_stride", LL), ("rows", I), ("d", I), ("first", I), ("eps", F),
    ]


class SampleParams(ctypes.Structure):
    _fields_ = [
        ("logits", P), ("logits_stride", LL), ("batch", I), ("vocab", I), ("uncond_rows", I),
        ("cfg_scale", F), ("temperature", F),
        ("top_k", I), ("top_p", F), ("seeds", P), ("step", P), ("position_offset", I),
        ("tokens", P), ("num_tokens", I), ("teacher", P), ("mixed_out", P),
        ("word_emb", P), ("pos_emb", P), ("d", I), ("next_input", P), ("next_token", P), ("advance", I),
    ]


class GemvParams(ctypes.Structure):
    _fields_ = [("x", P), ("x_stride", LL), ("w", P), ("y", P), ("y_stride", LL), ("rows", I), ("n", I), ("k", I)]


class GemvNext(ctypes.Structure):
    _fields_ = [("xg", P), ("xg_stride", LL), ("gm", P), ("gm_stride", LL), ("sq_part", P)]


class GemvFoldParams(ctypes.Structure):
    _fields_ = [("g", GemvParams), ("n", NormParams), ("next", GemvNext)]


class GemvNormParams(ctypes.Structure):
    _fields_ = [("g", GemvParams), ("sq_part", P), ("sq_parts", I), ("bias", P), ("bias_out", P),
                ("bias_stride", LL), ("eps", F)]


class GemmParams(ctypes.Structure):
    _fields_ = [("x", P), ("x_stride", LL), ("w", P), ("y", P), ("y_stride", LL), ("rows", I), ("n", I), ("k", I),
                ("splits", I)]


class GemmFoldParams(ctypes.Structure):
    _fields_ = [("g", GemmParams), ("n", NormParams), ("next", GemvNext)]


class GemmNormParams(ctypes.Structure):
    _fields_ = [("g", GemmParams), ("sq_part", P), ("sq_parts", I), ("bias", P), ("bias_out", P),
                ("bias_stride", LL), ("eps", F)]


STRUCTS = (SsuParams, ConvShift, GatedNormParams, NormParams, SampleParams, GemvParams, GemvNext, GemvFoldParams,
           GemvNormParams, GemmParams, GemmFoldParams, GemmNormParams)


def layout_asserts() -> str:
    """C static_asserts of every struct's size and field offsets as ctypes lays them out: a struct edited on one
    side only fails to compile (CI compiles the kernels) instead of passing garbage pointers at run time."""
    lines = ["\n// appended by plugins/kernels.py: the ctypes layout of each parameter struct"]
    for struct in STRUCTS:
        name = struct.__name__
        lines.append(f'static_assert(sizeof({name}) == {ctypes.sizeof(struct)}, "{name}: size differs from ctypes");')
        for field, _ in struct._fields_:
            offset = getattr(struct, field).offset
            lines.append(f'static_assert(__builtin_offsetof({name}, {field}) == {offset}, '
                         f'"{name}.{field}: offset differs from ctypes");')
    return "\n".join(lines) + "\n"


def _ptr(t) -> int | None:
    return None if t is None else t.data_ptr()


def ssu_params(*, xbc, z, dt, conv_state_in, conv_state_out, ssm_state_in, ssm_state_out, weights: dict,
               sumsq, y, headdim: int, d_state: int, ngroups: int, eps: float) -> SsuParams:
    """The one place SsuParams is filled (cuda backend, TensorRT plugin, tests). Tensors are torch views:
    xbc/z/dt/y may be strided row views (e.g. slices of in_proj's output); states are contiguous.
    `weights`: conv_weight (C, 1, W) or (C, W), conv_bias, dt_bias, A_log, D, norm_weight."""
    rows, d_inner, nheads = xbc.shape[0], z.shape[1], dt.shape[1]
    # The kernel's limits (warp-uniform state chunks, MAX_W taps, 64 groups in aim_gated_norm_apply's shared
    # array, ...) are checked here, where every caller passes (the TensorRT plugin calls no other check).
    d_conv = conv_state_in.shape[-1]
    check_shapes(headdim, d_state, d_conv, ngroups)
    conv_dim = d_inner + 2 * ngroups * d_state
    if (nheads * headdim != d_inner or nheads % ngroups or xbc.shape[1] != conv_dim
            or tuple(z.shape) != (rows, d_inner) or tuple(y.shape) != (rows, d_inner) or dt.shape[0] != rows
            or tuple(sumsq.shape) != (rows, nheads)
            or any(tuple(t.shape) != (rows, conv_dim, d_conv) for t in (conv_state_in, conv_state_out))
            or any(tuple(t.shape) != (rows, nheads, headdim, d_state) for t in (ssm_state_in, ssm_state_out))):
        raise KernelError(f"selective state update shapes disagree: xbc {tuple(xbc.shape)}, z {tuple(z.shape)}, "
                          f"dt {tuple(dt.shape)}, conv {tuple(conv_state_in.shape)}, ssm {tuple(ssm_state_in.shape)}, "
                          f"y {tuple(y.shape)}, sumsq {tuple(sumsq.shape)} (headdim {headdim}, d_state {d_state}, "
                          f"ngroups {ngroups})")
    for name, t in (("conv_state_in", conv_state_in), ("conv_state_out", conv_state_out),
                    ("ssm_state_in", ssm_state_in), ("ssm_state_out", ssm_state_out)):
        if not t.is_contiguous():
            raise KernelError(f"{name} must be contiguous")
    for name, t in (("xbc", xbc), ("z", z), ("dt", dt), ("y", y)):
        if t.stride(1) != 1:
            raise KernelError(f"{name} rows must be contiguous")
    for name, t in (("ssm_state_in", ssm_state_in), ("ssm_state_out", ssm_state_out),
                    ("conv_state_in", conv_state_in)):
        if t.data_ptr() % 16:  # the kernel copies states and conv windows in aligned chunks (cp.async)
            raise KernelError(f"{name} must be 16-byte aligned")
    w = dict(weights)
    for name, t in w.items():
        if not t.is_contiguous():  # a contiguous copy made here would be freed before the launch
            raise KernelError(f"weight {name} must be contiguous")
    return SsuParams(
        xbc=_ptr(xbc), xbc_stride=xbc.stride(0), z=_ptr(z), z_stride=z.stride(0), dt=_ptr(dt), dt_stride=dt.stride(0),
        conv_state_in=_ptr(conv_state_in), conv_state_out=_ptr(conv_state_out), ssm_state_in=_ptr(ssm_state_in),
        ssm_state_out=_ptr(ssm_state_out), conv_w=_ptr(w["conv_weight"]), conv_b=_ptr(w["conv_bias"]),
        dt_bias=_ptr(w["dt_bias"]), A_log=_ptr(w["A_log"]), D=_ptr(w["D"]), norm_w=_ptr(w["norm_weight"]),
        sumsq=_ptr(sumsq), y=_ptr(y), y_stride=y.stride(0), rows=rows, d_inner=d_inner,
        conv_dim=xbc.shape[1], nheads=nheads, headdim=headdim, d_state=d_state, ngroups=ngroups,
        d_conv=conv_state_in.shape[-1], eps=eps)


ELEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def ssu_smem_bytes(p: SsuParams, elem_bytes: int, stages: int) -> int:
    """Dynamic shared memory of aim_selective_state_update (as SsuRing there): a ring of `stages` stages (a state
    slice, its head's x conv windows, its group's B/C windows; 16-byte multiples), then two sets of the
    per-slice conv results (x, silu(z), norm_w of the head; B and C of the group) as float32."""
    stage = (p.headdim * p.d_state + (p.headdim + 2 * p.d_state) * p.d_conv) * elem_bytes
    return stages * ((stage + 15) // 16 * 16) + 2 * (3 * p.headdim + 2 * p.d_state) * 4


SSW_WARPS, SSW_STAGES = 2, 4  # aim_ssu_warps' warps per block and quarter-slice stages per warp (as there)
SSW_SHAPE = (64, 128, 4)  # the (headdim, d_state, d_conv) aim_ssu_warps is compiled for (SSU_FAST_* there)
# aim_ssu_warps from this many rows (SSU_WARP_ROWS, a define only the host reads; model_defines per width),
# aim_selective_state_update below; the AiM shape only. 128 rows: batch 64, where both AiM-B and AiM-XL gain.
SSU_WARP_ROWS = 128


def ssw_smem_bytes(elem_bytes: int, warps: int = SSW_WARPS, stages: int = SSW_STAGES) -> int:
    """Dynamic shared memory of aim_ssu_warps: per warp `stages` quarter slices (16 x 128 state elements), then
    the windows of one slice (64 x channels and 256 B/C channels of 4 elements)."""
    p, n, w = SSW_SHAPE
    return warps * (stages * (p // 4) * n + (p + 2 * n) * w) * elem_bytes


def conv_shift_params(p: SsuParams) -> ConvShift:
    """The B/C conv-window shift that the state update `p` leaves to the next kernel."""
    return ConvShift(xbc=p.xbc, xbc_stride=p.xbc_stride, state_in=p.conv_state_in, state_out=p.conv_state_out,
                     first=p.d_inner, count=2 * p.ngroups * p.d_state, conv_dim=p.conv_dim, width=p.d_conv)


def gated_norm_params(p: SsuParams) -> GatedNormParams:
    """Complete the op `p` started: normalise its y in place and shift its B/C windows (aim_gated_norm_apply)."""
    return GatedNormParams(y=p.y, y_stride=p.y_stride, sumsq=p.sumsq, rows=p.rows, d_inner=p.d_inner,
                           nheads=p.nheads, ngroups=p.ngroups, eps=p.eps, bc=conv_shift_params(p))


SSU_THREADS, SSU_STAGES, NORM_THREADS, NORM_PER, SAMPLE_THREADS = 256, 2, 256, 8, 1024  # as in aim_kernels.cu
NORM_INSTANCES = (3, 4, 6, NORM_PER)  # residual_norm_body's elements per thread (as in aim_kernels.cu)
# aim_cfg_sample: vocabulary <= SAMPLE_VMAX; dynamic shared memory NBINS * 8 + LCAP * 6 (as in aim_kernels.cu)
SAMPLE_VMAX, SAMPLE_SMEM = 16384, 4096 * 8 + 4096 * 6
MAX_W, VEC, MAX_STATE = 4, 8, 8192  # as in aim_kernels.cu


def check_shapes(headdim: int, d_state: int, d_conv: int, ngroups: int = 1) -> None:
    """The limits the kernels are written for (all AiM models satisfy them)."""
    if d_state % VEC or 256 % d_state:
        raise KernelError(f"d_state must divide 256 and be a multiple of {VEC}, got {d_state}")
    if (headdim * d_state) % (32 * VEC) or headdim * d_state > MAX_STATE:
        raise KernelError(f"headdim * d_state must be a multiple of {32 * VEC} and at most {MAX_STATE}, "
                          f"got {headdim} * {d_state}")
    if headdim + 2 * d_state > 512 or headdim > 128:
        raise KernelError(f"headdim + 2 * d_state must be at most 512 (headdim <= 128), got {headdim} + 2 * {d_state}")
    if not 1 <= d_conv <= MAX_W:  # (the window shifts write tap d_conv - 1)
        raise KernelError(f"d_conv must be in 1..{MAX_W}, got {d_conv}")
    if ngroups > 64:
        raise KernelError(f"ngroups must be <= 64, got {ngroups}")


KERNEL_NAMES = ("aim_selective_state_update", "aim_gated_norm_apply", "aim_residual_norm", "aim_cfg_sample",
                "aim_advance")
# aim_gemv_k<CH>_n<NT> (16-bit types): k = 256 * CH, 8 * NT output columns per block, rows <= 16 * min(4, 8 / NT)
GEMV_CHUNKS = (1, 2, 3, 4, 6, 8, 12)
GEMV_WIDE = {1: 4, 2: 4, 3: 4, 4: 2, 6: 2}  # CH -> NT used above GEMV_NARROW_ROWS rows (registers: CH * NT <= 12)
# AIM_RT_GEMV_WIDE="3:2,6:1" overrides some (to measure); NT 1, 2 or 4 with CH * NT <= 12
GEMV_WIDE.update({int(c): int(t) for c, t in (kv.split(":") for kv in os.environ.get("AIM_RT_GEMV_WIDE", "").split(",")
                                               if kv)})
GEMV_NARROW_ROWS = 16
# Up to GEMV_FAST_ROWS rows the backend uses aim_gemv, above it cuBLAS. Measured on the H200, 2026-11-29
# (bench/results/step_*): at 2 rows aim_gemv takes 2.3 µs for AiM-B's in_proj where cuBLAS takes 4.6 µs; at 32
# rows one 8-column tile per block re-read x from L2 so often that cuBLAS won (AiM-XL in_proj 14.0 vs 8.9 µs),
# hence the wider tiles there. AIM_RT_GEMV_ROWS overrides the limit (to measure).
GEMV_FAST_ROWS = int(os.environ.get("AIM_RT_GEMV_ROWS", "32"))


def gemv_tiles(rows: int, k: int, narrow_rows: int = GEMV_NARROW_ROWS) -> int:
    """NT, the 8-column tiles per block, for a product of `rows` rows and depth k (wide tiles above
    `narrow_rows`: a Kernels' gemv_narrow_rows, per model width)."""
    return GEMV_WIDE.get(k // 256, 1) if rows > narrow_rows else 1


def gemv_supported(dtype: str, rows: int, k: int, narrow_rows: int = GEMV_NARROW_ROWS) -> bool:
    """Whether aim_gemv computes this product (else the caller uses cuBLAS)."""
    if dtype == "float32" or rows <= 0 or k % 256 or k // 256 not in GEMV_CHUNKS:
        return False
    return rows <= 16 * min(4, 8 // gemv_tiles(rows, k, narrow_rows))


def _check_product(kind: str, x, w, y) -> tuple[int, int, int]:
    """(rows, k, n) of y = x @ w.T for our product kernels (`kind` names them in errors): matching shapes,
    contiguous 16-byte-aligned rows of x and y's unit column stride, w contiguous and 16-byte aligned."""
    rows, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or tuple(y.shape) != (rows, n):
        raise KernelError(f"{kind} shapes: x {tuple(x.shape)}, w {tuple(w.shape)}, y {tuple(y.shape)}")
    if (x.stride(1) != 1 or y.stride(1) != 1 or not w.is_contiguous() or (x.stride(0) * x.element_size()) % 16
            or x.data_ptr() % 16 or w.data_ptr() % 16):
        raise KernelError(f"{kind} needs contiguous, 16-byte-aligned rows of x and a contiguous, aligned w")
    return rows, k, n


def gemv_params(x, w, y) -> GemvParams:
    """y = x @ w.T for torch tensors: x (rows, k) with 16-byte-aligned rows, w (n, k) contiguous, y (rows, n)."""
    rows, k, n = _check_product("gemv", x, w, y)
    return GemvParams(x=x.data_ptr(), x_stride=x.stride(0), w=w.data_ptr(), y=y.data_ptr(), y_stride=y.stride(0),
                      rows=rows, n=n, k=k)


# Up to Kernels.fold_rows rows (FOLD_ROWS, a define only the host reads) the backend folds the residual add
# between layers into out_proj (GemvFoldParams in aim_kernels.cu). Measured on the H200 (bench/results/fold2_*,
# whole steps against the unfolded step, tokens identical): AiM-B batch 1 / 2 / 4 -8.3 / -6.2 / -5.0 %, AiM-XL
# -11.6 / -9.5 / -8.8 %; bench/results/fold3_*: AiM-B batch 4 / 8 -5.9 / -5.4 %, at 16 (32 rows) even then,
# -1.0 % in a later run (fold32_*: model_defines folds AiM-B's 17-32 rows). Where out_proj is an aim_gemm the
# fold is FOLD_GEMM's (aim_kernels.cu).
FOLD_ROWS = 16


def _check_fold(name: str, rows: int, n: int, norm: NormParams) -> None:
    """The norm a product folds must be of the product's rows and width, and not the first layer's (that one
    starts the residual from the embedding; a folded epilogue adds to it)."""
    if norm.rows != rows or norm.d != n:
        raise KernelError(f"{name}: the norm's rows x width {norm.rows} x {norm.d} are not the product's "
                          f"{rows} x {n}")
    if norm.first:
        raise KernelError(f"{name}: the first layer's norm (first=1) has no residual to add to; it is not folded")


def gemv_fold_params(x, w, y, norm: NormParams, to_next: GemvNext | None = None) -> GemvFoldParams:
    """out_proj y = x @ w.T with the residual add of `norm` (the next layer's NormParams) folded in: y is only
    its shape (not written). `to_next` (gemv_next): also what the next layer's in_proj takes to norm its own x."""
    rows, _, n = _check_product("aim_gemv_resid", x, w, y)
    _check_fold("aim_gemv_resid", rows, n, norm)
    if to_next is not None and to_next.xg and n % 8:
        raise KernelError(f"aim_gemv_resid: handing the next norm on needs a width that is a multiple of 8, not {n}")
    return GemvFoldParams(g=gemv_params(x, w, y), n=norm, next=to_next or GemvNext())


def _check_f32_rows(name: str, t, shape: tuple, contiguous: bool = False) -> None:
    import torch

    if t.dtype != torch.float32 or tuple(t.shape) != shape:
        raise KernelError(f"{name} must be float32 {shape}, not {t.dtype} {tuple(t.shape)}")
    if t.stride(1) != 1 or t.stride(0) % 4 or t.data_ptr() % 16 or (contiguous and t.stride(0) != shape[1]):
        raise KernelError(f"{name} needs {'contiguous' if contiguous else 'unit column stride and'} 16-byte-aligned "
                          "rows")


def gemv_next(xg, gm, sq_part) -> GemvNext:
    """What a folded out_proj hands to the next layer's in_proj when that one norms its own x (GemvNext in
    aim_kernels.cu): xg (rows, d) 16-bit, written with the summed residual times gm (rows, d) float32; sq_part
    (rows, d / 8) float32, each 8-column tile's sum of squares of the residual."""
    rows, d = xg.shape
    if xg.stride(1) != 1 or d % 8:
        raise KernelError(f"gemv_next: xg needs unit column stride and a width that is a multiple of 8, not {d}")
    _check_f32_rows("gemv_next: gm", gm, (rows, d))
    _check_f32_rows("gemv_next: sq_part", sq_part, (rows, d // 8), contiguous=True)
    return GemvNext(xg=xg.data_ptr(), xg_stride=xg.stride(0), gm=gm.data_ptr(), gm_stride=gm.stride(0),
                    sq_part=sq_part.data_ptr())


# Up to Kernels.norm_fold_rows rows (NORM_FOLD_ROWS, a define only the host reads; model_defines) the backend
# folds the residual norm between layers into in_proj where in_proj is an aim_gemv and out_proj folds the
# residual add (GemvNormParams in aim_kernels.cu): the norm kernel then runs only before the first layer and
# after the last. AIM_RT_NORM_FOLD=0 turns it off (the bits then are the separate norm's); AIM_RT_NORM_FOLD=N
# sets the rows (to measure).
NORM_FOLD_ROWS = 0


def gemv_norm_params(xg, sq_part, bias, w, y, eps: float) -> GemvNormParams:
    """in_proj of the normed residual from what the folded out_proj before it handed on (gemv_next): y = W xg /
    rms + bias row by row, rms from sq_part's tile sums, bias = W shift (gemv_norm_bias_params) (= W
    (rmsnorm(residual) * norm_w * (1 + scale) + shift) for xg = residual * gm rounded, gm = norm_w * (1 + scale)).
    xg (rows, k) with 16-byte-aligned rows, sq_part (rows, k / 8) and bias (rows, n) float32 contiguous, w (n, k)
    contiguous, y (rows, n)."""
    rows, k, n = _check_product("aim_gemv_norm", xg, w, y)
    _check_f32_rows("aim_gemv_norm: sq_part", sq_part, (rows, k // 8), contiguous=True)
    _check_f32_rows("aim_gemv_norm: bias", bias, (rows, n), contiguous=True)
    return GemvNormParams(g=gemv_params(xg, w, y), sq_part=sq_part.data_ptr(), sq_parts=k // 8,
                          bias=bias.data_ptr(), bias_out=None, bias_stride=n, eps=eps)


def gemv_norm_bias_params(shift, w, bias_out) -> GemvNormParams:
    """The normed in_proj's bias mode: bias_out (rows, n) float32 contiguous = W shift, in the order the product
    sums (made once per sample; a row's bits do not depend on the other rows)."""
    rows, n = bias_out.shape
    _check_f32_rows("aim_gemv_norm: bias_out", bias_out, (rows, n), contiguous=True)
    _, k, _ = _check_product("aim_gemv_norm (shift)", shift, w, bias_out)
    return GemvNormParams(g=gemv_params(shift, w, bias_out), sq_part=None, sq_parts=k // 8, bias=None,
                          bias_out=bias_out.data_ptr(), bias_stride=n, eps=0.0)


GEMM_BN, GEMM_BK = 64, 64  # as in aim_kernels.cu
# aim_gemm_m<mt>'s pipeline depth (GEMM_STAGES_M<mt>, passed to every step build; aim_kernels.cu has the same
# defaults; model_defines deepens them for the wide models)
GEMM_STAGES = {2: 4, 4: 4, 8: 4}
GEMM_MAX_ROWS = 128  # what the kernel takes (16 * its largest MT)
GEMM_ROWS = (33, GEMM_MAX_ROWS)  # where the backend uses it by default (below: aim_gemv; above: cuBLAS)


def gemm_mt(rows: int, available=(2, 4, 8)) -> int:
    """aim_gemm's instance (m-tiles of 16 rows) for `rows` rows: the smallest of those `available` that holds them."""
    return min(mt for mt in available if 16 * mt >= rows)


def gemm_smem_bytes(mt: int, stages: int) -> int:
    """aim_gemm_m<mt>'s dynamic shared memory: `stages` stages of an x chunk (16 * mt rows) and a weight chunk
    (GEMM_BN rows), GEMM_BK 16-bit elements each (the partial tile reuses it)."""
    return stages * (16 * mt + GEMM_BN) * GEMM_BK * 2 + 1024  # + what aligning the tiles to 1 KB may skip


def gemm_splits(n: int, k: int, num_sms: int) -> int:
    """Cluster size (the k split) of an aim_gemm of n columns and depth k: the smallest divisor of k's chunks
    (<= 8, a portable cluster) that gives every SM a CTA, else the largest."""
    tiles, chunks = -(-n // GEMM_BN), k // GEMM_BK
    divisors = [d for d in range(1, 9) if chunks % d == 0]
    for d in divisors:
        if tiles * d >= num_sms:
            return d
    return divisors[-1]


def gemm_fold_params(x, w, y, splits: int, norm: NormParams, to_next: GemvNext | None = None) -> GemmFoldParams:
    """out_proj y = x @ w.T through aim_gemm with the residual add of `norm` (the next layer's NormParams)
    folded in, as gemv_fold_params: y is only its shape (not written). The epilogue moves the float32 residual
    four columns at a time: n a multiple of 4, the residual 16-byte aligned. `to_next` (gemv_next): also what
    the next layer's in_proj takes to norm its own x (n a multiple of 8)."""
    rows, _, n = _check_product("aim_gemm_resid", x, w, y)
    _check_fold("aim_gemm_resid", rows, n, norm)
    if n % 4 or not norm.residual or norm.residual % 16:
        raise KernelError(f"aim_gemm_resid: needs a width that is a multiple of 4 (got {n}) and a 16-byte "
                          "aligned residual")
    if to_next is not None and to_next.xg and n % 8:
        raise KernelError(f"aim_gemm_resid: handing the next norm on needs a width that is a multiple of 8, not {n}")
    return GemmFoldParams(g=gemm_params(x, w, y, splits), n=norm, next=to_next or GemvNext())


def gemm_norm_params(xg, sq_part, bias, w, y, splits: int, eps: float) -> GemmNormParams:
    """in_proj of the normed residual through aim_gemm (aim_gemm_norm_m*), as gemv_norm_params; bias from
    gemm_norm_bias_params. (The epilogue's four columns need n a multiple of 4: the bias's aligned rows.)"""
    rows, k, n = _check_product("aim_gemm_norm", xg, w, y)
    _check_f32_rows("aim_gemm_norm: sq_part", sq_part, (rows, k // 8), contiguous=True)
    _check_f32_rows("aim_gemm_norm: bias", bias, (rows, n), contiguous=True)
    return GemmNormParams(g=gemm_params(xg, w, y, splits), sq_part=sq_part.data_ptr(), sq_parts=k // 8,
                          bias=bias.data_ptr(), bias_out=None, bias_stride=n, eps=eps)


def gemm_norm_bias_params(shift, w, bias_out, splits: int) -> GemmNormParams:
    """aim_gemm_norm's bias mode: bias_out (rows, n) float32 contiguous = W shift, summed as the product sums."""
    rows, n = bias_out.shape
    _check_f32_rows("aim_gemm_norm: bias_out", bias_out, (rows, n), contiguous=True)
    _, k, _ = _check_product("aim_gemm_norm (shift)", shift, w, bias_out)
    return GemmNormParams(g=gemm_params(shift, w, bias_out, splits), sq_part=None, sq_parts=k // 8, bias=None,
                          bias_out=bias_out.data_ptr(), bias_stride=n, eps=0.0)


def gemm_params(x, w, y, splits: int) -> GemmParams:
    """y = x @ w.T through aim_gemm: x (rows, k) with 16-byte-aligned rows, w (n, k) contiguous and aligned."""
    rows, k, n = _check_product("gemm", x, w, y)
    if k % (GEMM_BK * splits) or not 1 <= rows <= GEMM_MAX_ROWS:
        raise KernelError(f"aim_gemm takes 1-{GEMM_MAX_ROWS} rows and k a multiple of {GEMM_BK * splits}; "
                          f"got {rows} rows, k {k}")
    return GemmParams(x=x.data_ptr(), x_stride=x.stride(0), w=w.data_ptr(), y=y.data_ptr(), y_stride=y.stride(0),
                      rows=rows, n=n, k=k, splits=splits)


def pdl_attributes(major: int) -> list:
    """The launch attribute list that enables programmatic dependent launch on this compute capability (empty
    before Hopper, or with AIM_RT_PDL=0)."""
    from cuda.bindings import driver

    if major < 9 or os.environ.get("AIM_RT_PDL", "1") == "0":
        return []
    attr = driver.CUlaunchAttribute()
    attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    return [attr]


class Kernels:
    """The compiled module for one element type on the current CUDA device; launches on a given stream."""

    def __init__(self, dtype: str, device_index: int = 0, defines: dict | None = None,
                 gemv_depths: tuple[int, ...] | None = None, source_path: Path = SOURCE,
                 d_model: int | None = None):
        """`defines`: extra -D macros (benchmarks of kernel variants, e.g. SSU_THREADS, SSU_STAGES).
        `gemv_depths`: the k of every product the caller will run through `gemv` (compiles only those
        instances; a cold start pays for each); None: all of them.
        `source_path`: another version of aim_kernels.cu (benchmarks against an older kernel).
        `d_model`: the model's width (model_defines: the build measured best for it; the residual norm then
        takes rows of that width at most)."""
        import torch
        from cuda.bindings import driver

        self.driver = driver
        major, minor = torch.cuda.get_device_capability(device_index)
        self.arch = kernel_arch(major, minor)
        self.dtype = dtype
        torch.cuda.init()
        torch.empty(1, device=f"cuda:{device_index}")  # makes the primary context current for the driver API
        self.defines = dict(defines or {})
        self.ssu_threads = int(self.defines.get("SSU_THREADS", SSU_THREADS))
        self.ssu_stages = int(self.defines.get("SSU_STAGES", SSU_STAGES))
        self.ssu_max_blocks = None  # None: as many blocks as are resident at once; a number caps the grid (tests)
        self._ssu_occupancy: dict[tuple[str, int, int], int] = {}
        self.ssw_warps = int(self.defines.get("SSW_WARPS", SSW_WARPS))
        self.ssw_stages = int(self.defines.get("SSW_STAGES", SSW_STAGES))
        self.num_sms = torch.cuda.get_device_properties(device_index).multi_processor_count
        self.sample_threads = int(self.defines.get("SAMPLE_THREADS", SAMPLE_THREADS))
        builds = step_builds(dtype, self.defines, gemv_depths, d_model)
        self.modules = [_check(driver.cuModuleLoadData(compile_async(dtype, self.arch, d, source_path).result()),
                               "cuModuleLoadData") for d in builds]
        # the widest row the residual norm was compiled for
        self.norm_max_width = NORM_THREADS * int(builds[0].get("NORM_PER_ONLY") or NORM_PER)
        self.fn = {name: self._function(name) for name in KERNEL_NAMES}
        self.gemvs = set()
        for c, t in _gemv_pairs() if dtype != "float32" else ():
            fn = self._function(f"aim_gemv_k{c}_n{t}", required=False)
            if fn is not None:  # only the instances asked for (or an older source_path has none)
                self.fn[f"aim_gemv_k{c}_n{t}"] = fn
                self.gemvs.add((c, t))
        self.gemv_m1 = set()  # depths (CH) with a one-m-tile instance in this build
        for c in GEMV_CHUNKS if dtype != "float32" else ():
            fn = self._function(f"aim_gemv_k{c}_n1_m1", required=False)
            if fn is not None:
                self.fn[f"aim_gemv_k{c}_n1_m1"] = fn
                self.gemv_m1.add(c)
        # aim_gemv's one-tile blocks (and one-m-tile instances) up to this many rows, wide tiles above
        # (model_defines: a define only this reads)
        self.gemv_narrow_rows = int(builds[0].get("GEMV_NARROW_ROWS", GEMV_NARROW_ROWS))
        self.resids = set()  # names of the products with the residual add folded in (aim_gemv_resid_*)
        for name in [f"aim_gemv_resid_k{c}_n{t}" for c, t in _gemv_pairs()] + [
                f"aim_gemv_resid_k{c}_n1_m1" for c in GEMV_CHUNKS] if dtype != "float32" else ():
            if (fn := self._function(name, required=False)) is not None:
                self.fn[name] = fn
                self.resids.add(name)
        self.fold_rows = int(builds[0].get("FOLD_ROWS", FOLD_ROWS))
        self.gemv_norms = set()  # names of the products with the residual norm folded in (aim_gemv_norm_*)
        for name in [f"aim_gemv_norm_k{c}_n{t}" for c, t in _gemv_pairs()] + [
                f"aim_gemv_norm_k{c}_n1_m1" for c in GEMV_CHUNKS] if dtype != "float32" else ():
            if (fn := self._function(name, required=False)) is not None:
                self.fn[name] = fn
                self.gemv_norms.add(name)
        self.norm_fold_rows = int(builds[0].get("NORM_FOLD_ROWS", NORM_FOLD_ROWS))
        # the state update's warp kernel (AiM shape) from this many rows; None: not in this build
        self.ssu_warp_rows = int(builds[0].get("SSU_WARP_ROWS", SSU_WARP_ROWS))
        if (fn := self._function("aim_ssu_warps", required=False)) is not None:
            self.fn["aim_ssu_warps"] = fn
        else:
            self.ssu_warp_rows = None
        # the folded out_proj's one-m-tile instance up to this many rows (RESID_M1_ROWS, model_defines)
        self.resid_m1_rows = min(int(builds[0].get("RESID_M1_ROWS", self.gemv_narrow_rows)), self.gemv_narrow_rows)
        self.gemms = {mt: fn for mt in (2, 4, 8)  # aim_gemm instances (16-bit types on sm_90+, AIM_GEMM builds)
                      if (fn := self._function(f"aim_gemm_m{mt}", required=False)) is not None}
        self.gemm_resids = {mt: fn for mt in self.gemms  # the same with the residual add folded in (FOLD_GEMM)
                            if (fn := self._function(f"aim_gemm_resid_m{mt}", required=False)) is not None}
        self.gemm_norms = {mt: fn for mt in self.gemms  # and with the residual norm folded in (GEMM_NORM)
                           if (fn := self._function(f"aim_gemm_norm_m{mt}", required=False)) is not None}
        # the row counts the backend gives aim_gemm: GEMM_MIN_ROWS / GEMM_MAX_ROWS (model_defines; defines that
        # only this reads) move them
        self.gemm_rows = (int(builds[0].get("GEMM_MIN_ROWS", GEMM_ROWS[0])),
                          min(int(builds[0].get("GEMM_MAX_ROWS", GEMM_ROWS[1])), GEMM_MAX_ROWS))
        # the folded out_proj is aim_gemm's up to this many rows (GEMM_FOLD_MAX_ROWS, a define only this reads;
        # model_defines), the other products up to gemm_rows[1]
        self.gemm_fold_max_rows = min(max(int(builds[0].get("GEMM_FOLD_MAX_ROWS", 0)), self.gemm_rows[1]),
                                      GEMM_MAX_ROWS)
        # each instance's pipeline depth: the define the kernel was compiled with (step_builds passes them all)
        self.gemm_stages = {mt: int(builds[0][f"GEMM_STAGES_M{mt}"]) for mt in GEMM_STAGES}
        # The CTAs aim_gemm's k split aims at (gemm_splits; GEMM_CTAS / GEMM_FOLD_CTAS, defines only this reads):
        # one per SM, two for the folded out_proj. Measured on the H200 (bench/results/gemm_ctas_h200_2026-12-04.*
        # and gemm_foldctas_h200_2026-12-04.*, whole steps, tokens differ only by the sums' order): every product
        # aiming at 66 or 264 CTAs +2 to +18 % per step at every model (in_proj and lm_head slower alone); the
        # folded out_proj alone at 264, which moves AiM-XL's from 6 to 8 splits (AiM-B's and AiM-L's are 8 either
        # way), AiM-XL batch 12 / 16 / 24 / 32 -3.7 / -2.6 / -2.5 / -2.1 %.
        self.gemm_ctas = int(builds[0].get("GEMM_CTAS", self.num_sms))
        self.gemm_fold_ctas = int(builds[0].get("GEMM_FOLD_CTAS", 2 * self.num_sms))
        self._gemm_smem_set: set[tuple[str, int]] = set()
        self._max_smem = 0
        # Programmatic dependent launch (see PDL_WAIT in aim_kernels.cu): Hopper and later; AIM_RT_PDL=0 turns
        # it off (to measure what it gains).
        self._pdl_attrs = pdl_attributes(major)
        self.pdl = bool(self._pdl_attrs)

    def _function(self, name: str, required: bool = True):
        for module in self.modules:  # the first program that has it (an older source_path may hold it in several)
            err, fn = self.driver.cuModuleGetFunction(module, name.encode())
            if int(err) == 0:
                return fn
        if required:
            raise KernelError(f"no kernel {name} in the compiled programs")
        return None

    def _launch(self, name: str, grid: tuple, block: int, smem: int, stream: int, params) -> None:
        holder = (ctypes.c_void_p * 1)(ctypes.addressof(params)) if params is not None else None
        args = ctypes.addressof(holder) if holder is not None else 0
        if not self.pdl:
            _check(self.driver.cuLaunchKernel(self.fn[name], *grid, block, 1, 1, smem, self.driver.CUstream(stream),
                                              args, 0), name)
            return
        config = self.driver.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = grid
        config.blockDimX, config.blockDimY, config.blockDimZ = block, 1, 1
        config.sharedMemBytes = smem
        config.hStream = self.driver.CUstream(stream)
        config.attrs = self._pdl_attrs
        config.numAttrs = 1
        _check(self.driver.cuLaunchKernelEx(config, self.fn[name], args, 0), name)

    def selective_state_update(self, p: SsuParams, stream: int, finish: bool = True) -> None:
        """The whole op: y gated-normed, conv and SSM states updated. With finish=False two things are left to
        the next kernel (aim_residual_norm does both, when ngroups == 1): y stays g * norm_w, to be scaled by its
        row's 1/rms from p.sumsq, and the group B/C conv windows are not yet shifted (conv_shift_params(p))."""
        name, grid, threads, smem = self.ssu_launch(p)
        self._launch(name, (grid, 1, 1), threads, smem, stream, p)
        if finish:
            self._launch("aim_gated_norm_apply", (p.rows, 1, 1), NORM_THREADS, 0, stream, gated_norm_params(p))

    def ssu_warps_apply(self, p: SsuParams) -> bool:
        """Whether the state update `p` runs aim_ssu_warps (this build has it, the AiM shape, enough rows)."""
        return (self.ssu_warp_rows is not None and p.rows >= self.ssu_warp_rows
                and (p.headdim, p.d_state, p.d_conv) == SSW_SHAPE)

    def ssu_launch(self, p: SsuParams) -> tuple[str, int, int, int]:
        """(kernel, grid, threads per block, dynamic shared memory) of the state update `p`: a fixed set of
        resident blocks (no tail wave), each block (aim_selective_state_update) or warp (aim_ssu_warps) a run of
        consecutive (row, head) slices."""
        slices = p.rows * p.nheads
        if self.ssu_warps_apply(p):
            name, threads = "aim_ssu_warps", 32 * self.ssw_warps
            smem = ssw_smem_bytes(ELEM_BYTES[self.dtype], self.ssw_warps, self.ssw_stages)
            most = max(1, slices // self.ssw_warps)  # every warp has a slice
        else:
            name, threads = "aim_selective_state_update", self.ssu_threads
            smem = ssu_smem_bytes(p, ELEM_BYTES[self.dtype], self.ssu_stages)
            most = slices
        grid = min(most, self._ssu_blocks_per_sm(smem, name, threads) * self.num_sms, self.ssu_max_blocks or 1 << 30)
        return name, grid, threads, smem

    def _ssu_blocks_per_sm(self, smem: int, name: str = "aim_selective_state_update",
                           threads: int | None = None) -> int:
        """Resident state-update blocks per SM for `smem` bytes of dynamic shared memory (set up once per size)."""
        threads = threads or self.ssu_threads
        key = (name, threads, smem)
        if key not in self._ssu_occupancy:
            d, fn = self.driver, self.fn[name]
            attr = d.CUfunction_attribute
            largest = max((k[2] for k in self._ssu_occupancy if k[0] == name), default=0)
            if smem > largest:  # the limit only grows: launches of a smaller size stay valid
                _check(d.cuFuncSetAttribute(fn, attr.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem),
                       "cuFuncSetAttribute")
            # shared memory over L1: the kernel reads its state through shared memory only
            _check(d.cuFuncSetAttribute(fn, attr.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 100),
                   "cuFuncSetAttribute")
            n = _check(d.cuOccupancyMaxActiveBlocksPerMultiprocessor(fn, threads, smem),
                       "cuOccupancyMaxActiveBlocksPerMultiprocessor")
            if n < 1:
                raise KernelError(f"the state update ({name}) does not fit on an SM with {smem} bytes of shared memory")
            self._ssu_occupancy[key] = n
        return self._ssu_occupancy[key]

    def gemv_supported(self, rows: int, k: int) -> bool:
        """Whether this build's aim_gemv computes a product of `rows` rows and depth k (its wide tiles above
        gemv_narrow_rows)."""
        return gemv_supported(self.dtype, rows, k, self.gemv_narrow_rows)

    def gemv(self, p: GemvParams, stream: int) -> None:
        """y = x @ w.T (gemv_params); the caller checked gemv_supported. Up to 16 rows through the one-m-tile
        instance where this build has it (gemv_m1_chunks)."""
        if (p.k // 256, gemv_tiles(p.rows, p.k, self.gemv_narrow_rows)) not in self.gemvs:
            raise KernelError(f"aim_gemv for k={p.k} was not compiled (gemv_depths)")
        self._launch_gemv("aim_gemv", p, p, stream)

    def _gemv_name(self, rows: int, k: int, kind: str = "aim_gemv") -> str:
        """The instance of `kind` (aim_gemv, aim_gemv_resid) this build runs for `rows` rows of depth k: the
        one-m-tile one where it was compiled and the rows allow (gemv_narrow_rows; resid_m1_rows for the folded
        products)."""
        c, nt = k // 256, gemv_tiles(rows, k, self.gemv_narrow_rows)
        m1 = f"{kind}_k{c}_n1_m1"
        limit = self.resid_m1_rows if kind == "aim_gemv_resid" else self.gemv_narrow_rows
        return m1 if nt == 1 and rows <= limit and m1 in self.fn else f"{kind}_k{c}_n{nt}"

    def _launch_gemv(self, kind: str, g: GemvParams, params, stream: int) -> None:
        """One block of 8 * NT output columns per block (NT: gemv_tiles), 256 threads."""
        name = self._gemv_name(g.rows, g.k, kind)
        if name not in self.fn:
            raise KernelError(f"{name} was not compiled (gemv_depths, resid_chunk)")
        nt = gemv_tiles(g.rows, g.k, self.gemv_narrow_rows)
        self._launch(name, ((g.n + 8 * nt - 1) // (8 * nt), 1, 1), 256, 0, stream, params)

    def fold_supported(self, rows: int, k: int, n: int) -> bool:
        """Whether the backend folds the residual add into out_proj (depth k, n columns) at this many rows in
        this build: where its product is an aim_gemv with a folded instance, up to fold_rows rows, or an
        aim_gemm with one (aim_gemm_resid: n a multiple of 4)."""
        if self.gemm_supported(rows, k, folded=True):
            return n % 4 == 0 and gemm_mt(rows, self.gemms) in self.gemm_resids
        return (rows <= self.fold_rows and self.gemv_supported(rows, k)
                and self._gemv_name(rows, k, "aim_gemv_resid") in self.resids)

    def norm_fold_supported(self, rows: int, k: int) -> bool:
        """Whether the backend folds the residual norm into in_proj (depth k = d_model) at this many rows in this
        build: where in_proj is an aim_gemv with a normed instance, up to norm_fold_rows rows, or an aim_gemm
        with one (GEMM_NORM); not cuBLAS's rows (the caller also needs out_proj to fold the residual add:
        fold_supported)."""
        if self.gemm_supported(rows, k):  # aim_gemm's rows: where this build has the normed instance (GEMM_NORM)
            return gemm_mt(rows, self.gemms) in self.gemm_norms
        return (0 < rows <= min(self.norm_fold_rows, GEMV_FAST_ROWS)
                and self.gemv_supported(rows, k) and self._gemv_name(rows, k, "aim_gemv_norm") in self.gemv_norms)

    def gemv_norm(self, p: GemvNormParams, stream: int) -> None:
        """in_proj with the residual norm folded in (gemv_norm_params; the caller checked norm_fold_supported)."""
        self._launch_gemv("aim_gemv_norm", p.g, p, stream)

    def gemv_fold(self, p: GemvFoldParams, stream: int) -> None:
        """out_proj with the residual add folded in (gemv_fold_params; the caller checked fold_supported)."""
        self._launch_gemv("aim_gemv_resid", p.g, p, stream)

    def gemm_supported(self, rows: int, k: int, folded: bool = False) -> bool:
        """Whether the backend's product of `rows` rows and depth k (`folded`: out_proj with the residual add
        folded in) is aim_gemm's in this build."""
        top = self.gemm_fold_max_rows if folded else self.gemm_rows[1]
        return bool(self.gemms) and self.gemm_rows[0] <= rows <= top and k % GEMM_BK == 0

    def gemm(self, p: GemmParams, stream: int) -> None:
        """y = x @ w.T (gemm_params; the caller checked gemm_supported): clusters of p.splits CTAs."""
        self._launch_gemm("aim_gemm", self.gemms, p, p, stream)

    def gemm_fold(self, p: GemmFoldParams, stream: int) -> None:
        """out_proj with the residual add folded in (gemm_fold_params; the caller checked fold_supported)."""
        self._launch_gemm("aim_gemm_resid", self.gemm_resids, p.g, p, stream)

    def gemm_norm(self, p: GemmNormParams, stream: int) -> None:
        """in_proj with the residual norm folded in, or its bias mode (gemm_norm_params, gemm_norm_bias_params;
        the caller checked norm_fold_supported)."""
        self._launch_gemm("aim_gemm_norm", self.gemm_norms, p.g, p, stream)

    def _launch_gemm(self, kind: str, fns: dict, p: GemmParams, params, stream: int) -> None:
        mt = gemm_mt(p.rows, self.gemms)
        if mt not in fns:
            raise KernelError(f"{kind}_m{mt} was not compiled (FOLD_GEMM, FOLD_GEMM_M2 / _M8, GEMM_M2, GEMM_NORM)")
        fn, smem = fns[mt], gemm_smem_bytes(mt, self.gemm_stages[mt])
        d = self.driver
        if (kind, mt) not in self._gemm_smem_set:
            _check(d.cuFuncSetAttribute(fn, d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                        smem), "cuFuncSetAttribute")
            self._gemm_smem_set.add((kind, mt))
        cluster = d.CUlaunchAttribute()
        cluster.id = d.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        cluster.value.clusterDim.x, cluster.value.clusterDim.y, cluster.value.clusterDim.z = p.splits, 1, 1
        holder = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        config = d.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = -(-p.n // GEMM_BN) * p.splits, 1, 1
        config.blockDimX, config.blockDimY, config.blockDimZ = 256, 1, 1
        config.sharedMemBytes = smem
        config.hStream = d.CUstream(stream)
        config.attrs = [cluster] + self._pdl_attrs
        config.numAttrs = len(config.attrs)
        _check(d.cuLaunchKernelEx(config, fn, ctypes.addressof(holder), 0), f"{kind}_m{mt}")

    def residual_norm(self, p: NormParams, stream: int) -> None:
        if p.d > self.norm_max_width:
            raise KernelError(f"aim_residual_norm was compiled for d_model up to {self.norm_max_width}, not {p.d}")
        self._launch("aim_residual_norm", (p.rows, 1, 1), NORM_THREADS, 0, stream, p)

    def cfg_sample(self, p: SampleParams, stream: int) -> None:
        if not 0 < p.vocab <= SAMPLE_VMAX:
            raise KernelError(f"the sampling kernel handles vocabularies up to {SAMPLE_VMAX}, not {p.vocab}")
        if SAMPLE_SMEM > self._max_smem:  # above the 48 KiB default: opt in once
            attr = self.driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _check(self.driver.cuFuncSetAttribute(self.fn["aim_cfg_sample"], attr, SAMPLE_SMEM), "cuFuncSetAttribute")
            self._max_smem = SAMPLE_SMEM
        self._launch("aim_cfg_sample", (p.batch, 1, 1), self.sample_threads, SAMPLE_SMEM, stream, p)

    def advance(self, step_ptr: int, stream: int) -> None:
        self._launch("aim_advance", (1, 1, 1), 1, 0, stream, ctypes.c_void_p(step_ptr))
