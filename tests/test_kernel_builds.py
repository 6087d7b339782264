"""How the kernels are built at a cold start: three NVRTC programs (step, sampler, the state update's warp kernel)
plus the VQ decoder's, compiled
in background threads once per process, and started before torch is imported where the CLI can."""

import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_aim_rt_and_the_cli_load_no_torch():
    """The CLI starts the model-independent compiles before torch loads: importing aim_rt, its kernel module
    and the CLI must not import torch (the public names still resolve, on first use)."""
    code = ("import sys, aim_rt, aim_rt.plugins.kernels, aim_rt.cli\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert aim_rt.SamplingSettings().top_k == 600 and 'torch' in sys.modules\n"
            "assert callable(aim_rt.load_model) and aim_rt.preset('AiM-B').d_model == 768\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import aim_rt

        aim_rt.nope  # noqa: B018


def test_step_builds_split_the_step_from_the_sampler():
    from aim_rt.plugins.kernels import step_builds

    step, sampler, warps = step_builds("bfloat16", {"SSU_STAGES": 3}, gemv_depths=(768, 1536), d_model=768)
    assert step["AIM_PARTS"] == 1 and sampler["AIM_PARTS"] == 2 and warps["AIM_PARTS"] == 4
    assert sampler["GEMV_INSTANCES"] == warps["GEMV_INSTANCES"] == "/* none */"
    assert step["SSU_STAGES"] == sampler["SSU_STAGES"] == warps["SSU_STAGES"] == 3
    # the model's build reaches the step program only: the other two are the same for every model, and the
    # defines only the host reads stay out of them
    assert "NORM_PER_ONLY" in step and "NORM_PER_ONLY" not in sampler and "NORM_PER_ONLY" not in warps
    assert step_builds("bfloat16", {"SSU_STAGES": 3}, d_model=1536)[1:] == [sampler, warps]
    rows = step_builds("bfloat16", {"SSU_STAGES": 3, "SSU_WARP_ROWS": 1, "GEMM_CTAS": 66})
    assert rows[0]["SSU_WARP_ROWS"] == 1 and rows[0]["GEMM_CTAS"] == 66 and rows[1:] == [sampler, warps]
    step, *_ = step_builds("bfloat16", {"SSU_STAGES": 3}, gemv_depths=(768, 1536))
    # only the instances of the two depths (k = 256 * CH): CH 3 and 6, each narrow and wide
    assert step["GEMV_INSTANCES"].split() == ["X(3,1)", "X(6,1)", "X(3,4)", "X(6,2)"]
    every, *_ = step_builds("bfloat16")  # no depths given: the source's default list, every instance
    assert "GEMV_INSTANCES" not in every


def test_gemm_depths_are_passed_to_every_step_build_and_keep_two_ctas_per_sm():
    """aim_gemm's pipeline depths: the step program always gets GEMM_STAGES_M<mt> (a model's width deepens them,
    explicit defines win), the source's own defaults are the host's table, and at every model's depths two CTAs
    fit an SM (Hopper: 228 KB of shared memory per SM, 1 KB of it reserved per CTA) so that no product's grid
    needs a second wave."""
    import re

    from aim_rt.plugins.kernels import GEMM_STAGES, SOURCE, gemm_smem_bytes, step_builds

    def depths(defines=None, d_model=None):
        step, *_ = step_builds("bfloat16", defines, gemv_depths=(768, 1536), d_model=d_model)
        return {mt: step[f"GEMM_STAGES_M{mt}"] for mt in (2, 4, 8)}

    assert depths() == depths(d_model=768) == GEMM_STAGES
    assert depths(d_model=1024) == {**GEMM_STAGES, 4: 6} and depths(d_model=1536) == {**GEMM_STAGES, 2: 8, 4: 6}
    assert depths({"GEMM_STAGES_M2": 5}, d_model=1536) == {**GEMM_STAGES, 2: 5, 4: 6}
    source = {int(m): int(n) for m, n in re.findall(r"#define GEMM_STAGES_M(\d) (\d+)", SOURCE.read_text())}
    assert source == GEMM_STAGES
    for d_model in (768, 1024, 1536, 2048):
        for mt, stages in depths(d_model=d_model).items():
            assert 2 * (gemm_smem_bytes(mt, stages) + 1024) <= 228 * 1024, (d_model, mt)


def test_compile_async_builds_each_program_once(monkeypatch):
    """Concurrent requests for one build share one compile; another build compiles separately; a failed
    build is tried again on the next request."""
    from aim_rt.plugins import kernels

    calls, gate = [], threading.Event()

    def fake_compile(dtype, arch, use_cache, check_layout, defines, source_path):
        calls.append((dtype, arch, tuple(sorted(defines.items()))))
        gate.wait(5)
        if defines.get("FAIL"):
            raise kernels.KernelError("boom")
        return b"cubin:" + repr(defines).encode()

    monkeypatch.setattr(kernels, "compile_cubin", fake_compile)
    monkeypatch.setattr(kernels, "_BUILDS", {})
    a = kernels.compile_async("bfloat16", "sm_90", {"AIM_PARTS": 1})
    b = kernels.compile_async("bfloat16", "sm_90", {"AIM_PARTS": "1"})  # the same -D text
    c = kernels.compile_async("bfloat16", "sm_90", {"AIM_PARTS": 2})
    gate.set()
    assert a is b and a.result() == b.result() and c.result() != a.result()
    assert len(calls) == 2
    bad = kernels.compile_async("bfloat16", "sm_80", {"FAIL": 1})
    with pytest.raises(kernels.KernelError):
        bad.result()
    again = kernels.compile_async("bfloat16", "sm_80", {"FAIL": 1})
    assert again is not bad
    with pytest.raises(kernels.KernelError):
        again.result()
    assert len(calls) == 4


def test_device_arch_without_a_gpu_or_with_one():
    import torch

    from aim_rt.plugins.kernels import device_arch, kernel_arch

    # Hopper builds for its architecture-specific target (wgmma), every other GPU for its plain one
    assert [kernel_arch(*cc) for cc in ((8, 0), (8, 9), (9, 0), (10, 0))] == ["sm_80", "sm_89", "sm_90a", "sm_100"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        assert device_arch(0) == kernel_arch(major, minor)
    else:
        assert device_arch(0) is None


def test_pdl_early_rows_reaches_every_program(monkeypatch):
    """AIM_RT_PDL_EARLY_ROWS (to measure the launch order) becomes a -D of the step, sampler and warp state update
    programs, and is absent otherwise (the source's default, and the default cache keys)."""
    from aim_rt.plugins.kernels import step_builds

    assert all("PDL_EARLY_ROWS" not in b for b in step_builds("bfloat16"))
    monkeypatch.setenv("AIM_RT_PDL_EARLY_ROWS", "0")
    assert [b["PDL_EARLY_ROWS"] for b in step_builds("bfloat16", gemv_depths=(768,))] == [0, 0, 0]


def test_model_width_picks_the_measured_build():
    """A model's step program holds only the residual norm's instance for its d_model (NORM_PER_ONLY), from
    d_model 1024 the one-m-tile products (Y) of some or all of its depths (gemv_m1_chunks) besides the
    others, out_proj's instances with the residual add folded in (XR / YR at d_inner: resid_chunk) and below
    d_model 1024 in_proj's with the norm folded in (XN at d_model); without a width, the source's defaults. A width past the widest norm is refused; explicit defines
    win."""
    from aim_rt.plugins.kernels import KernelError, norm_instance, step_builds

    assert [norm_instance(d) for d in (64, 768, 1024, 1536, 2048)] == [3, 3, 4, 6, 8]
    with pytest.raises(KernelError, match="up to 2048"):
        norm_instance(2049)
    base, sampler, _ = step_builds("bfloat16", gemv_depths=(768, 1536), d_model=768)
    assert base["NORM_PER_ONLY"] == 3 and "NORM_PER_ONLY" not in sampler
    assert base["GEMV_INSTANCES"].split() == ["X(3,1)", "X(6,1)", "X(3,4)", "X(6,2)", "XR(6,1)",
                                             "XR(6,2)", "YR(6)", "XN(3,1)", "XN(3,4)"]
    xl = step_builds("bfloat16", gemv_depths=(1536, 3072), d_model=1536)[0]
    assert xl["NORM_PER_ONLY"] == 6
    assert xl["GEMV_INSTANCES"].split() == ["X(6,1)", "X(12,1)", "X(6,2)", "Y(6)", "Y(12)", "XR(12,1)",
                                           "YR(12)"]
    large = step_builds("bfloat16", gemv_depths=(1024, 2048), d_model=1024)[0]  # only depths with wide instances
    assert large["NORM_PER_ONLY"] == 4
    assert large["GEMV_INSTANCES"].split() == ["X(4,1)", "X(8,1)", "X(4,2)", "Y(4)", "XR(8,1)"]
    default = step_builds("bfloat16", gemv_depths=(1536, 3072))[0]
    assert "NORM_PER_ONLY" not in default and "Y(" not in default["GEMV_INSTANCES"]
    assert "XR(" not in default["GEMV_INSTANCES"]  # the folded products only for a known width
    assert step_builds("bfloat16", {"NORM_PER_ONLY": 8}, d_model=768)[0]["NORM_PER_ONLY"] == 8
    # aim_gemm's rows as measured per width: AiM-B the kernel's default (33-128), AiM-L 24-128, AiM-XL 3-64
    gemm_rows = lambda b: (b.get("GEMM_MIN_ROWS"), b.get("GEMM_MAX_ROWS"))  # noqa: E731
    assert [gemm_rows(b) for b in (base, large, xl, default)] == [(None, None), (24, 128), (3, 64), (None, None)]
    assert gemm_rows(step_builds("bfloat16", {"GEMM_MAX_ROWS": 128}, d_model=1536)[0]) == (3, 128)
    # aim_gemv's wide tiles from 9 rows from d_model 1024 (a define only the host reads), else from 17
    assert [b.get("GEMV_NARROW_ROWS") for b in (base, large, xl, default)] == [None, 8, 8, None]
    # out_proj's folded one-m-tile instance: AiM-B up to 2 rows (a define only the host reads), wider models as
    # their products (gemv_m1_chunks); without it, none
    assert [b.get("RESID_M1_ROWS") for b in (base, large, xl, default)] == [2, None, None, None]
    assert "YR(" not in step_builds("bfloat16", {"RESID_M1_ROWS": 0}, (768, 1536), 768)[0]["GEMV_INSTANCES"]
    # out_proj's folded instances in the tiles it has up to FOLD_ROWS rows (AiM-B: 32, so its wide tiles too; a
    # define only the host reads; elsewhere 16)
    assert [b.get("FOLD_ROWS") for b in (base, large, xl, default)] == [32, None, None, None]
    assert "XR(6,2)" not in step_builds("bfloat16", {"FOLD_ROWS": 16}, (768, 1536), 768)[0]["GEMV_INSTANCES"]
    # aim_gemm's folded 32-row instance (FOLD_GEMM_M2) from d_model 1024; the folded 128-row one (FOLD_GEMM_M8)
    # at every known width, from 1024 with the folded out_proj on aim_gemm to 128 rows (GEMM_FOLD_MAX_ROWS)
    assert [b.get("FOLD_GEMM_M2") for b in (base, large, xl, default)] == [None, 1, 1, None]
    assert [(b.get("GEMM_FOLD_MAX_ROWS"), b.get("FOLD_GEMM_M8")) for b in (base, large, xl, default)] == [
        (None, 1), (128, 1), (128, 1), (None, None)]
    # the state update's warp kernel from 96 rows at AiM-B's width, 64 from 1024 (a define only the host reads);
    # without a width the source's default
    assert [b.get("SSU_WARP_ROWS") for b in (base, large, xl, default)] == [96, 64, 64, None]
    # in_proj norming its own x at all of aim_gemv's rows below d_model 1024 (a define only the host reads)
    assert [b.get("NORM_FOLD_ROWS") for b in (base, large, xl, default)] == [32, None, None, None]
    # ... and on aim_gemm's rows: from d_model 1536 the normed instances of the MTs those rows run (AiM-XL 3-64:
    # m2, m4; GEMM_NORM_ON, AIM_RT_GEMM_NORM: test below), at 1024 the 32-row one (AiM-L 24-32), none below;
    # without a width the source's default (every instance)
    assert [b.get("GEMM_NORM") for b in (base, large, xl, default)] == [0, 2, 2 | 4, None]


def test_gemm_norm_instances_follow_the_models_aim_gemm_rows(monkeypatch):
    """AIM_RT_GEMM_NORM=1: at every width the normed aim_gemm instances of the MTs the model's aim_gemm rows run
    (AiM-B 33-128: m4, m8; AiM-L 24-128: m2, m4, m8; AiM-XL 3-64: m2, m4), over the model's own choice; =0 none; an
    explicit GEMM_NORM define wins over both."""
    from aim_rt.plugins.kernels import gemm_norm_mask, step_builds

    monkeypatch.setenv("AIM_RT_GEMM_NORM", "1")
    assert [step_builds("bfloat16", d_model=d)[0]["GEMM_NORM"] for d in (768, 1024, 1536)] == [4 | 8, 2 | 4 | 8, 2 | 4]
    assert step_builds("bfloat16", {"GEMM_NORM": 2}, d_model=1536)[0]["GEMM_NORM"] == 2
    assert step_builds("bfloat16", {"GEMM_MIN_ROWS": 33, "GEMM_MAX_ROWS": 128}, d_model=1536)[0]["GEMM_NORM"] == 12
    assert step_builds("bfloat16", {"GEMM_M2": 0}, d_model=1536)[0]["GEMM_NORM"] == 4
    assert gemm_norm_mask({"GEMM_MIN_ROWS": 3, "GEMM_MAX_ROWS": 128}) == 14
    assert gemm_norm_mask({"GEMM_MIN_ROWS": 65, "GEMM_MAX_ROWS": 64}) == 0
    monkeypatch.setenv("AIM_RT_GEMM_NORM", "0")
    assert [step_builds("bfloat16", d_model=d)[0]["GEMM_NORM"] for d in (768, 1024, 1536)] == [0, 0, 0]


def test_fold_gemm_m2_m8_add_folded_instances_only_where_aim_gemm_folds():
    """The sm_90 step program's folded aim_gemm instances: the 64-row one by default (FOLD_GEMM 1), the 32-row
    / 128-row one too with FOLD_GEMM_M2 / _M8, none with FOLD_GEMM 0 whatever FOLD_GEMM_M2 says, all three with
    FOLD_GEMM 2."""
    from test_cuda_backend import _nvrtc_usable

    from aim_rt.plugins.kernels import compile_cubin

    if not _nvrtc_usable():
        pytest.skip("cuda-python with an NVRTC library is not installed")

    common = {"AIM_PARTS": 1, "GEMV_INSTANCES": "/* none */", "NORM_PER_ONLY": 6}

    def folded(**defines):
        cubin = compile_cubin("bfloat16", "sm_90", use_cache=False, defines={**common, **defines})
        assert b"aim_gemm_m4" in cubin  # the plain instance is there in every build
        return [mt for mt in (2, 4, 8) if f"aim_gemm_resid_m{mt}".encode() in cubin]

    assert folded() == [4]
    assert folded(FOLD_GEMM_M2=1) == [2, 4]
    # the normed in_proj's instances: GEMM_NORM's bits (every one by default)
    normed = lambda **d: [mt for mt in (2, 4, 8) if f"aim_gemm_norm_m{mt}".encode() in compile_cubin(  # noqa: E731
        "bfloat16", "sm_90", use_cache=False, defines={**common, **d})]
    assert normed(GEMM_NORM=4 | 8) == [4, 8]
    assert normed(GEMM_NORM=0) == []
    assert folded(FOLD_GEMM=0, FOLD_GEMM_M2=1) == []
    assert folded(FOLD_GEMM_M8=1) == [4, 8]
    assert folded(FOLD_GEMM=2) == [2, 4, 8]


def test_narrow_models_launch_after_norms_and_products_at_once(monkeypatch):
    """Below d_model 1024 the residual norms and products let their successors launch at once at every batch
    (measured for AiM-B); wider models, the sampler's program and a build without a width keep the source's
    PDL_EARLY_ROWS for every kind; an asked-for AIM_RT_PDL_EARLY_ROWS applies to every kind."""
    from aim_rt.plugins.kernels import PDL_EARLY_ANY, step_builds

    base, sampler, _ = step_builds("bfloat16", gemv_depths=(768, 1536), d_model=768)
    assert base["PDL_EARLY_NORM"] == base["PDL_EARLY_GEMV"] == PDL_EARLY_ANY and "PDL_EARLY_SSU" not in base
    assert not any(k.startswith("PDL_EARLY") for k in sampler)
    for build in (step_builds("bfloat16", gemv_depths=(1536, 3072), d_model=1536)[0], step_builds("bfloat16")[0]):
        assert not any(k.startswith("PDL_EARLY") for k in build)
    monkeypatch.setenv("AIM_RT_PDL_EARLY_ROWS", "0")
    base = step_builds("bfloat16", gemv_depths=(768, 1536), d_model=768)[0]
    assert base["PDL_EARLY_ROWS"] == 0 and "PDL_EARLY_NORM" not in base and "PDL_EARLY_GEMV" not in base


def test_norm_width_build_has_one_norm_instance():
    """The one-width build compiles for sm_90 and holds less code than the all-widths build (one instance of
    the norm's body instead of four)."""
    from test_cuda_backend import _nvrtc_usable

    from aim_rt.plugins.kernels import compile_cubin

    if not _nvrtc_usable():
        pytest.skip("cuda-python with an NVRTC library is not installed")

    common = {"AIM_PARTS": 1, "GEMV_INSTANCES": "/* none */"}
    every = compile_cubin("bfloat16", "sm_90", use_cache=False, defines=common)
    one = compile_cubin("bfloat16", "sm_90", use_cache=False, defines={**common, "NORM_PER_ONLY": 3})
    assert b"aim_residual_norm" in one and len(one) < len(every)


def test_per_kind_launch_limits_change_hopper_code_only():
    """PDL_EARLY_NORM reaches the program on sm_90 (the norm's launch_dependents moves) and is a no-op on sm_80,
    where there is no programmatic dependent launch."""
    from test_cuda_backend import _nvrtc_usable

    from aim_rt.plugins.kernels import PDL_EARLY_ANY, compile_cubin

    if not _nvrtc_usable():
        pytest.skip("cuda-python with an NVRTC library is not installed")

    common = {"AIM_PARTS": 1, "GEMV_INSTANCES": "/* none */", "NORM_PER_ONLY": 3}
    for arch, differs in (("sm_90", True), ("sm_80", False)):
        plain = compile_cubin("bfloat16", arch, use_cache=False, defines=common)
        early = compile_cubin("bfloat16", arch, use_cache=False, defines={**common, "PDL_EARLY_NORM": PDL_EARLY_ANY})
        assert (plain != early) == differs, arch


def test_gemm_instance_is_the_smallest_that_holds_the_rows():
    """aim_gemm_m2 up to 32 rows, m4 up to 64, m8 up to 128; a build without m2 (GEMM_M2=0) runs m4 from 1 row."""
    from aim_rt.plugins.kernels import gemm_mt

    assert [gemm_mt(r) for r in (1, 32, 33, 64, 65, 128)] == [2, 2, 4, 4, 8, 8]
    assert [gemm_mt(r, (4, 8)) for r in (1, 32, 33, 65)] == [4, 4, 4, 8]


def test_gemm_split_is_the_smallest_that_reaches_the_ctas_asked_for():
    """gemm_splits: the smallest k split (a divisor of k / 64, at most 8) whose CTAs reach the target, else the
    largest; at AiM-XL's shapes on 132 SMs in_proj splits 2, out_proj 6 at one CTA per SM and 8 at two (the
    folded out_proj's target), lm_head 1."""
    from aim_rt.plugins.kernels import gemm_splits

    d_in_proj = 2 * 3072 + 2 * 128 + 48  # AiM-XL: z, x, B, C, dt
    assert gemm_splits(d_in_proj, 1536, 132) == 2
    assert [gemm_splits(1536, 3072, ctas) for ctas in (66, 132, 264)] == [3, 6, 8]
    assert gemm_splits(16384, 1536, 132) == 1
    assert gemm_splits(768, 1536, 132) == 8  # AiM-B's out_proj: 12 tiles, the largest split
    assert gemm_splits(64, 320, 132) == 5  # k / 64 = 5: divisors 1 and 5 only


def test_resid_chunk_is_out_projs_depth():
    """The residual add folds into out_proj, the product whose depth is not d_model; none without one."""
    from aim_rt.plugins.kernels import resid_chunk

    assert resid_chunk(768, [3, 6]) == 6 and resid_chunk(1536, [6, 12]) == 12 and resid_chunk(256, [1, 2]) == 2
    assert resid_chunk(768, [3]) is None and resid_chunk(64, [0]) is None  # (a depth of 128 has no product)
    from aim_rt.plugins.kernels import step_builds

    assert "R(" not in step_builds("bfloat16", gemv_depths=(64, 128), d_model=64)[0]["GEMV_INSTANCES"]


def test_gemm_fold_params_refuse_what_the_folded_epilogue_cannot_take():
    """aim_gemm's folded epilogue moves the float32 residual four columns at a time: a width that is not a
    multiple of 4, a residual not 16-byte aligned, a norm of other rows or width, or the first layer's norm
    (aim_gemv's fold too) fail, saying which (CPU tensors: only the checks run, nothing is launched)."""
    import torch

    from aim_rt.plugins.kernels import KernelError, NormParams, gemm_fold_params, gemv_fold_params

    rows, k = 4, 128
    residual = torch.zeros(rows * 68 + 4)

    def args(n, offset=0, norm_rows=rows, first=0):
        x, w = torch.zeros(rows, k, dtype=torch.bfloat16), torch.zeros(n, k, dtype=torch.bfloat16)
        y = torch.zeros(rows, n, dtype=torch.bfloat16)
        return x, w, y, 2, NormParams(residual=residual.data_ptr() + 4 * offset, rows=norm_rows, d=n, first=first)

    p = gemm_fold_params(*args(64))
    assert (p.g.rows, p.g.n, p.g.k, p.g.splits, p.n.d, p.n.residual) == (rows, 64, k, 2, 64, residual.data_ptr())
    with pytest.raises(KernelError, match="multiple of 4 \\(got 66\\)"):
        gemm_fold_params(*args(66))
    with pytest.raises(KernelError, match="16-byte aligned residual"):
        gemm_fold_params(*args(64, offset=1))
    with pytest.raises(KernelError, match="rows x width 3 x 64 are not the product's 4 x 64"):
        gemm_fold_params(*args(64, norm_rows=3))
    with pytest.raises(KernelError, match="first layer's norm"):
        gemm_fold_params(*args(64, first=1))
    x, w, y, _, norm = args(64, first=1)
    with pytest.raises(KernelError, match="aim_gemv_resid: the first layer's norm"):
        gemv_fold_params(x, w, y, norm)


def test_fold_rule_follows_the_product_and_its_folded_instances():
    """Kernels.fold_supported (CPU: a Kernels with only the attributes the rule reads): where out_proj is an
    aim_gemv, up to fold_rows rows with a folded instance of its tiles; where it is an aim_gemm, where that
    instance has a folded twin (FOLD_GEMM) and the width is a multiple of 4; never on cuBLAS's rows."""
    from aim_rt.plugins.kernels import Kernels

    kern = object.__new__(Kernels)
    kern.dtype, kern.gemv_narrow_rows, kern.fold_rows, kern.resid_m1_rows = "bfloat16", 16, 32, 2
    kern.gemms, kern.gemm_rows, kern.gemm_fold_max_rows = {2: 0, 4: 0, 8: 0}, (33, 96), 96
    kern.gemm_resids = {4: 0}  # FOLD_GEMM 1: the 64-row instance only
    kern.resids = {"aim_gemv_resid_k6_n1", "aim_gemv_resid_k6_n2", "aim_gemv_resid_k6_n1_m1"}
    kern.fn = dict.fromkeys(kern.resids)
    rows = (1, 2, 16, 17, 32, 33, 64, 65, 96, 97)
    assert [r for r in rows if kern.fold_supported(r, 1536, 768)] == [1, 2, 16, 17, 32, 33, 64]
    assert [r for r in rows if kern.fold_supported(r, 1536, 766)] == [1, 2, 16, 17, 32]  # aim_gemm: n % 4
    kern.resids.discard("aim_gemv_resid_k6_n2")  # no wide folded instance: its rows (17-32) do not fold
    assert [r for r in rows if kern.fold_supported(r, 1536, 768)] == [1, 2, 16, 33, 64]
    kern.gemm_resids = {4: 0, 8: 0}
    assert [r for r in rows if kern.fold_supported(r, 1536, 768)] == [1, 2, 16, 33, 64, 65, 96]
    # the folded out_proj on aim_gemm past the other products' rows (GEMM_FOLD_MAX_ROWS): 97-128 with m8
    kern.gemm_rows, kern.gemm_fold_max_rows = (33, 64), 128
    assert [r for r in (64, 65, 128, 129) if kern.fold_supported(r, 1536, 768)] == [64, 65, 128]
    assert [r for r in (64, 65, 128) if kern.gemm_supported(r, 1536)] == [64]  # in_proj: cuBLAS's rows
    kern.fold_rows, kern.gemm_resids = 2, {}
    assert [r for r in rows if kern.fold_supported(r, 1536, 768)] == [1, 2]


def test_warp_state_update_is_compiled_for_both_archs_and_can_be_left_out():
    """aim_ssu_warps (cp.async: sm_80+) is in its own program (AIM_PARTS 4) for sm_80 and sm_90, not in the
    step's, and gone with SSU_WARPS_KERNEL=0; its default shared memory leaves room for SSW_MIN_BLOCKS (6 blocks
    of 2 warps) on a Hopper SM (228 KB, 1 KB of it reserved per block), which its register budget
    (__launch_bounds__) assumes."""
    from test_cuda_backend import _nvrtc_usable

    from aim_rt.plugins.kernels import compile_cubin, ssw_smem_bytes

    assert 6 * (ssw_smem_bytes(2) + 1024) <= 228 * 1024 < 7 * (ssw_smem_bytes(2) + 1024)
    assert ssw_smem_bytes(2, warps=4) == 2 * ssw_smem_bytes(2) == ssw_smem_bytes(4)
    if not _nvrtc_usable():
        pytest.skip("cuda-python with an NVRTC library is not installed")
    common = {"AIM_PARTS": 4, "GEMV_INSTANCES": "/* none */"}
    for arch in ("sm_80", "sm_90"):
        cubin = compile_cubin("bfloat16", arch, use_cache=False, defines=common)
        assert b"aim_ssu_warps" in cubin and b"aim_selective_state_update" not in cubin, arch
    assert b"aim_ssu_warps" not in compile_cubin("bfloat16", "sm_90", use_cache=False,
                                                 defines={**common, "SSU_WARPS_KERNEL": 0})
    step = compile_cubin("bfloat16", "sm_90", use_cache=False, defines={**common, "AIM_PARTS": 1, "NORM_PER_ONLY": 3})
    assert b"aim_selective_state_update" in step and b"aim_ssu_warps" not in step


@pytest.mark.parametrize("shape,match", [((64, 128, 0), "d_conv must be in 1..4, got 0"),
                                         ((64, 128, 5), "d_conv must be in 1..4, got 5"),
                                         ((64, 12, 4), "d_state must divide 256"),
                                         ((256, 128, 4), "headdim \\* d_state must be")])
def test_state_update_shapes_outside_the_kernels_limits_are_refused(shape, match):
    """The state update's and the window shifts' limits (check_shapes): a conv of width 0 (whose shift would
    write before its window) or past MAX_W, and state tiles the kernels do not tile, are refused by name; the
    AiM shape passes."""
    from aim_rt.plugins.kernels import KernelError, check_shapes

    check_shapes(64, 128, 4)
    with pytest.raises(KernelError, match=match):
        check_shapes(*shape)


def test_normed_in_proj_instances_follow_norm_fold_rows():
    """in_proj with the residual norm folded in (aim_gemv_norm_*) is compiled only where NORM_FOLD_ROWS asks for
    it, in the tiles in_proj has up to those rows (and FOLD_ROWS: it needs the folded out_proj's sum), with the
    one-m-tile instance where the model runs one for its plain products; AIM_RT_NORM_FOLD=0 turns it off."""
    from aim_rt.plugins.kernels import step_builds

    def inst(d_model, **defines):
        return step_builds("bfloat16", defines, (d_model, 2 * d_model), d_model)[0]["GEMV_INSTANCES"].split()

    assert not [i for i in inst(768, NORM_FOLD_ROWS=0) if i.startswith(("XN", "YN"))]
    assert [i for i in inst(768, NORM_FOLD_ROWS=32) if i.startswith(("XN", "YN"))] == ["XN(3,1)", "XN(3,4)"]
    assert [i for i in inst(768, NORM_FOLD_ROWS=8) if i.startswith(("XN", "YN"))] == ["XN(3,1)"]
    assert [i for i in inst(768, NORM_FOLD_ROWS=32, FOLD_ROWS=8) if i.startswith(("XN", "YN"))] == ["XN(3,1)"]
    assert [i for i in inst(1536, NORM_FOLD_ROWS=2) if i.startswith(("XN", "YN"))] == ["XN(6,1)", "YN(6)"]


def test_norm_fold_can_be_turned_off_from_the_environment(monkeypatch):
    from aim_rt.plugins.kernels import step_builds

    monkeypatch.setenv("AIM_RT_NORM_FOLD", "0")
    step = step_builds("bfloat16", {}, (768, 1536), 768)[0]
    assert step["NORM_FOLD_ROWS"] == 0 and "XN(" not in step["GEMV_INSTANCES"]
    monkeypatch.setenv("AIM_RT_GEMM_NORM", "1")
    assert step_builds("bfloat16", {}, (1536, 3072), 1536)[0]["GEMM_NORM"] == 0  # nor on aim_gemm's rows


def test_gemv_norm_params_and_gemv_next_refuse_what_the_kernels_cannot_take():
    """The tile sums of squares must be float32 (rows, k / 8) contiguous, the bias float32 (rows, n) contiguous,
    gm float32 of xg's shape with aligned rows, xg and the shift rows a product takes; a width not a multiple
    of 8 cannot be handed on (CPU tensors: only the checks run)."""
    import torch

    from aim_rt.plugins.kernels import KernelError, gemv_next, gemv_norm_bias_params, gemv_norm_params

    rows, k, n = 4, 256, 64
    w, y = torch.zeros(n, k, dtype=torch.bfloat16), torch.zeros(rows, n, dtype=torch.bfloat16)
    xg, shift = torch.zeros(rows, k, dtype=torch.bfloat16), torch.zeros(rows, k, dtype=torch.bfloat16)
    parts, gm, bias = torch.zeros(rows, k // 8), torch.zeros(rows, k), torch.zeros(rows, n)
    p = gemv_norm_params(xg, parts, bias, w, y, 1e-5)
    assert (p.g.rows, p.g.n, p.g.k, p.sq_parts, p.bias_stride, p.bias_out) == (rows, n, k, k // 8, n, None)
    with pytest.raises(KernelError, match="sq_part must be float32 \\(4, 32\\)"):
        gemv_norm_params(xg, parts[:, :16], bias, w, y, 1e-5)
    with pytest.raises(KernelError, match="sq_part needs contiguous 16-byte-aligned rows"):
        gemv_norm_params(xg, torch.zeros(rows, k // 4)[:, :k // 8], bias, w, y, 1e-5)
    with pytest.raises(KernelError, match="bias must be float32 \\(4, 64\\)"):
        gemv_norm_params(xg, parts, bias.bfloat16(), w, y, 1e-5)
    with pytest.raises(KernelError, match="aim_gemv_norm shapes"):
        gemv_norm_params(xg, parts, bias, w[:, :128], y, 1e-5)
    b = gemv_norm_bias_params(shift, w, bias)
    assert (b.g.x, b.bias_out, b.bias, b.bias_stride) == (shift.data_ptr(), bias.data_ptr(), None, n)
    with pytest.raises(KernelError, match="aim_gemv_norm \\(shift\\)"):
        gemv_norm_bias_params(torch.zeros(k, rows, dtype=torch.bfloat16).t(), w, bias)
    with pytest.raises(KernelError, match="bias_out must be float32"):
        gemv_norm_bias_params(shift, w, bias.bfloat16())
    nxt = gemv_next(xg, gm, parts)
    assert (nxt.xg, nxt.xg_stride, nxt.gm_stride) == (xg.data_ptr(), k, k)
    with pytest.raises(KernelError, match="gm must be float32"):
        gemv_next(xg, gm.bfloat16(), parts)
    with pytest.raises(KernelError, match="gm needs unit column stride"):
        gemv_next(xg, torch.zeros(k, rows).t(), parts)
    with pytest.raises(KernelError, match="multiple of 8"):
        gemv_next(xg[:, :252], gm[:, :252], parts[:, :31])


def test_gemm_norm_params_and_the_gemm_fold_hand_on_refuse_what_the_kernels_cannot_take():
    """aim_gemm's normed in_proj checks as aim_gemv's does (its epilogue's four columns: aligned bias rows); its
    folded out_proj hands on only a width that is a multiple of 8 (CPU tensors)."""
    import torch

    from aim_rt.plugins.kernels import (ConvShift, KernelError, NormParams, gemm_fold_params, gemm_norm_bias_params,
                                        gemm_norm_params, gemv_next)

    rows, k, n = 4, 256, 64
    w, y = torch.zeros(n, k, dtype=torch.bfloat16), torch.zeros(rows, n, dtype=torch.bfloat16)
    xg, shift = torch.zeros(rows, k, dtype=torch.bfloat16), torch.zeros(rows, k, dtype=torch.bfloat16)
    parts, bias = torch.zeros(rows, k // 8), torch.zeros(rows, n)
    p = gemm_norm_params(xg, parts, bias, w, y, 2, 1e-5)
    assert (p.g.rows, p.g.n, p.g.k, p.g.splits, p.sq_parts, p.bias_stride, p.bias_out) == (rows, n, k, 2, k // 8,
                                                                                          n, None)
    with pytest.raises(KernelError, match="sq_part must be float32"):
        gemm_norm_params(xg, parts[:, :16], bias, w, y, 2, 1e-5)
    with pytest.raises(KernelError, match="bias needs contiguous 16-byte-aligned rows"):  # the four columns
        gemm_norm_params(xg, parts, bias[:, :62].contiguous(), w[:62], y[:, :62], 2, 1e-5)
    with pytest.raises(KernelError, match="k a multiple of 512"):
        gemm_norm_params(xg, parts, bias, w, y, 8, 1e-5)
    b = gemm_norm_bias_params(shift, w, bias, 1)
    assert (b.g.x, b.bias_out, b.bias, b.g.splits) == (shift.data_ptr(), bias.data_ptr(), None, 1)
    with pytest.raises(KernelError, match="bias_out must be float32"):
        gemm_norm_bias_params(shift, w, bias.bfloat16(), 1)
    # the folded out_proj (k -> n = d): hands on to gemv_next's buffers, or nothing
    residual = torch.zeros(rows, 260)
    norm = NormParams(residual=residual.data_ptr(), rows=rows, d=n, bc=ConvShift())
    q = gemm_fold_params(xg, w, y, 1, norm, gemv_next(torch.zeros(rows, n, dtype=torch.bfloat16),
                                                      torch.zeros(rows, n), torch.zeros(rows, n // 8)))
    assert q.next.xg and q.next.sq_part
    assert not gemm_fold_params(xg, w, y, 1, norm).next.xg
    norm.d = 60
    nxt = gemv_next(torch.zeros(rows, 64, dtype=torch.bfloat16), torch.zeros(rows, 64), torch.zeros(rows, 8))
    with pytest.raises(KernelError, match="multiple of 8"):
        gemm_fold_params(xg, w[:60], torch.zeros(rows, 60, dtype=torch.bfloat16), 1, norm, nxt)


def test_norm_fold_rule_is_in_proj_on_aim_gemv_up_to_norm_fold_rows():
    """Kernels.norm_fold_supported (CPU: a Kernels with only the attributes the rule reads): up to norm_fold_rows
    rows where in_proj is an aim_gemv with a normed instance of its tiles; on aim_gemm's rows where the build has
    the normed instance of the rows' MT (GEMM_NORM); never on cuBLAS's rows."""
    from aim_rt.plugins.kernels import Kernels

    kern = object.__new__(Kernels)
    kern.dtype, kern.gemv_narrow_rows, kern.norm_fold_rows = "bfloat16", 16, 32
    kern.gemms, kern.gemm_rows, kern.gemm_fold_max_rows = {2: 0, 4: 0, 8: 0}, (33, 96), 96
    kern.gemv_norms = {"aim_gemv_norm_k3_n1", "aim_gemv_norm_k3_n4"}
    kern.fn = dict.fromkeys(kern.gemv_norms)
    kern.gemm_norms = {4: 0}  # aim_gemm_norm_m4 only: 33-64 rows
    rows = (1, 2, 16, 17, 32, 33, 64, 65, 100)
    assert [r for r in rows if kern.norm_fold_supported(r, 768)] == [1, 2, 16, 17, 32, 33, 64]
    kern.gemm_norms = {8: 0}  # 65-96 rows (cuBLAS's above)
    assert [r for r in rows if kern.norm_fold_supported(r, 768)] == [1, 2, 16, 17, 32, 65]
    kern.gemm_norms = {}
    rows = (1, 2, 16, 17, 32, 33, 64)
    assert [r for r in rows if kern.norm_fold_supported(r, 768)] == [1, 2, 16, 17, 32]
    assert not [r for r in rows if kern.norm_fold_supported(r, 1536)]  # no instance of that depth
    kern.gemm_rows = (3, 96)  # aim_gemm from 3 rows (AiM-XL's rule)
    assert [r for r in rows if kern.norm_fold_supported(r, 768)] == [1, 2]
    kern.gemm_rows, kern.norm_fold_rows = (33, 96), 8
    assert [r for r in rows if kern.norm_fold_supported(r, 768)] == [1, 2]
    kern.gemv_norms.discard("aim_gemv_norm_k3_n4")
    kern.norm_fold_rows = 32
    assert [r for r in rows if kern.norm_fold_supported(r, 768)] == [1, 2, 16]
