"""The fused CUDA kernels and the cuda backend against the reference. GPU tests skip cleanly without CUDA."""

import importlib.util

import pytest
import torch

import aim_rt
from aim_rt import ops
from aim_rt.decoding import sample_tokens, sampler_logits
from aim_rt.sampling import SamplingSettings, draw
from conftest import rel_err

HAS_NVRTC = importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings") is not None
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")


def _nvrtc_usable() -> bool:
    if not HAS_NVRTC:
        return False
    try:
        from cuda.bindings import nvrtc

        return int(nvrtc.nvrtcVersion()[0]) == 0
    except Exception:
        return False


@pytest.mark.skipif(not _nvrtc_usable(), reason="cuda-python with an NVRTC library is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_kernels_compile(arch, dtype):
    from aim_rt.plugins.kernels import compile_cubin

    cubin = compile_cubin(dtype, arch, use_cache=False)
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 10_000
    # the tensor-core products exist for 16-bit types only
    assert (b"aim_gemv_k3_n1" in cubin) == (dtype != "float32")
    assert (b"aim_gemv_resid_k6_n1" in cubin) == (dtype != "float32")


@pytest.mark.skipif(not _nvrtc_usable(), reason="cuda-python with an NVRTC library is not installed")
def test_only_the_requested_gemv_instances_are_compiled():
    from aim_rt.plugins.kernels import compile_cubin

    cubin = compile_cubin("bfloat16", "sm_90", use_cache=False, defines={"GEMV_INSTANCES": "X(3,1) X(6,2)"})
    assert b"aim_gemv_k3_n1" in cubin and b"aim_gemv_k6_n2" in cubin
    assert b"aim_gemv_k6_n1" not in cubin and b"aim_gemv_k12_n1" not in cubin


@pytest.fixture(autouse=True)
def _no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _ssu_inputs(cfg, rows, dtype, g):
    dev = "cuda"
    r = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g)).to(dev, dtype)  # noqa: E731
    return dict(
        xbc=r(rows, cfg.conv_dim), z=r(rows, cfg.d_inner), dt=r(rows, cfg.nheads, scale=0.5),
        conv_state=r(rows, cfg.conv_dim, cfg.d_conv), ssm_state=r(rows, cfg.nheads, cfg.headdim, cfg.d_state),
        conv_weight=r(cfg.conv_dim, 1, cfg.d_conv, scale=0.5), conv_bias=r(cfg.conv_dim, scale=0.1),
        dt_bias=r(cfg.nheads, scale=0.5) - 3, A_log=r(cfg.nheads, scale=0.5) + 1, D=r(cfg.nheads),
        norm_weight=1 + r(cfg.d_inner, scale=0.1))


def ssu_params_for(cfg, x, in_place=True):
    """SsuParams of inputs `x` (_ssu_inputs), with fresh y and sumsq; ping-pong outputs are fresh tensors."""
    from aim_rt.plugins.kernels import ssu_params

    rows = x["xbc"].shape[0]
    dev, dt = x["xbc"].device, x["xbc"].dtype
    conv_out = x["conv_state"] if in_place else torch.empty_like(x["conv_state"])
    ssm_out = x["ssm_state"] if in_place else torch.empty_like(x["ssm_state"])
    y = torch.empty(rows, cfg.d_inner, device=dev, dtype=dt)
    sumsq = torch.zeros(rows, cfg.nheads, device=dev)
    weights = {k: x[k] for k in ("conv_weight", "conv_bias", "dt_bias", "A_log", "D", "norm_weight")}
    return ssu_params(xbc=x["xbc"], z=x["z"], dt=x["dt"], conv_state_in=x["conv_state"], conv_state_out=conv_out,
                      ssm_state_in=x["ssm_state"], ssm_state_out=ssm_out, weights=weights, sumsq=sumsq, y=y,
                      headdim=cfg.headdim, d_state=cfg.d_state, ngroups=cfg.ngroups, eps=cfg.norm_eps), \
        (y, sumsq, conv_out, ssm_out)


def run_ssu_kernel(kernels, cfg, x, in_place=True, finish=True):
    """The kernel as the op (finish=True: y gated-normed, states complete), or as the cuda backend runs it
    (finish=False: y is g * norm_w, to be scaled by each row's 1/rms from the returned sumsq, and the group
    B/C conv windows are left to the next kernel)."""
    p, (y, sumsq, conv_out, ssm_out) = ssu_params_for(cfg, x, in_place)
    kernels.selective_state_update(p, torch.cuda.current_stream().cuda_stream, finish=finish)
    torch.cuda.synchronize()
    if not finish:
        return (y, sumsq), conv_out, ssm_out
    return y, conv_out, ssm_out


# fp32 kernels match the reference to 1e-5; bf16 kernels keep float32 math and round once per output
TOLS = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@needs_gpu
@pytest.mark.parametrize("preset", ["AiM-B", "AiM-L", "AiM-XL"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_place", [True, False])
def test_ssu_kernel_matches_reference(preset, dtype, in_place):
    from aim_rt.plugins.kernels import Kernels

    cfg = aim_rt.preset(preset)
    kernels = Kernels("float32" if dtype == torch.float32 else "bfloat16")
    x = _ssu_inputs(cfg, rows=6, dtype=dtype, g=torch.Generator().manual_seed(0))
    x_again = {k: v.clone() for k, v in x.items()}  # the first run updates x's states in place
    ref = ops.selective_state_update(*[t.clone() for t in x.values()], headdim=cfg.headdim, d_state=cfg.d_state,
                                   ngroups=cfg.ngroups, eps=cfg.norm_eps)
    got = run_ssu_kernel(kernels, cfg, x, in_place)
    for name, r, o in zip(["y", "conv_state", "ssm_state"], ref, got):
        assert rel_err(o, r) <= TOLS[dtype], (name, rel_err(o, r))
    # the folded form the cuda backend runs: y / rms(g) recovered from the per-head sums of squares
    (g_w, sumsq), _, _ = run_ssu_kernel(kernels, cfg, x_again, in_place, False)
    inv = torch.rsqrt(sumsq.sum(1, keepdim=True) / cfg.d_inner + cfg.norm_eps)
    assert rel_err(g_w.float() * inv, ref[0]) <= TOLS[dtype]


@needs_gpu
@pytest.mark.parametrize("max_blocks", [None, 3])
@pytest.mark.parametrize("ngroups", [1, 2, 4])
def test_ssu_kernel_groups(ngroups, max_blocks):
    """ngroups > 1: heads share their group's B/C and the norm is per group (aim_gated_norm_apply). With 3
    blocks each block runs through many slices, crossing rows and groups (B/C recomputed on each change)."""
    from aim_rt.plugins.kernels import Kernels

    cfg = aim_rt.AiMConfig(d_model=256, n_layer=1, ngroups=ngroups, d_state=64, headdim=32)
    kernels = Kernels("float32")
    kernels.ssu_max_blocks = max_blocks
    for in_place in (True, False):
        x = _ssu_inputs(cfg, rows=5, dtype=torch.float32, g=torch.Generator().manual_seed(ngroups))
        ref = ops.selective_state_update(*[t.clone() for t in x.values()], headdim=cfg.headdim,
                                       d_state=cfg.d_state, ngroups=cfg.ngroups, eps=cfg.norm_eps)
        for name, r, o in zip(["y", "conv_state", "ssm_state"], ref, run_ssu_kernel(kernels, cfg, x, in_place)):
            assert rel_err(o, r) <= 1e-5, (name, in_place, rel_err(o, r))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssu_kernel_independent_of_grid(dtype):
    """Each block of the state update runs through a run of (row, head) slices with a ring of prefetched states:
    outputs are bit-identical whatever the number of blocks (one slice per block, runs longer than the ring,
    runs crossing rows), in place and ping-pong, and match the reference."""
    from aim_rt.plugins.kernels import Kernels

    cfg = aim_rt.preset("AiM-B")
    kernels = Kernels("float32" if dtype == torch.float32 else "bfloat16")
    x0 = _ssu_inputs(cfg, rows=6, dtype=dtype, g=torch.Generator().manual_seed(3))
    ref = ops.selective_state_update(*[t.clone() for t in x0.values()], headdim=cfg.headdim, d_state=cfg.d_state,
                                   ngroups=cfg.ngroups, eps=cfg.norm_eps)
    first = None
    for max_blocks in (None, 1, 5, 7, 50, 143):
        kernels.ssu_max_blocks = max_blocks
        for in_place in (True, False):
            x = {k: v.clone() for k, v in x0.items()}
            (g_w, sumsq), conv, ssm = run_ssu_kernel(kernels, cfg, x, in_place, finish=False)
            got = [g_w, sumsq, conv[:, :cfg.d_inner], ssm]  # (ping-pong leaves the B/C windows unwritten)
            if first is None:
                first = got
                inv = torch.rsqrt(sumsq.sum(1, keepdim=True) / cfg.d_inner + cfg.norm_eps)
                assert rel_err(g_w.float() * inv, ref[0]) <= TOLS[dtype]
                assert rel_err(ssm, ref[2]) <= TOLS[dtype]
                # x windows are the kernel's; B/C windows are left to the next kernel (unchanged here)
                assert torch.equal(conv[:, :cfg.d_inner], ref[1][:, :cfg.d_inner])
            for name, a, b in zip(["y", "sumsq", "conv_state", "ssm_state"], got, first):
                assert torch.equal(a, b), (name, max_blocks, in_place)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ssu_warp_kernel_is_the_block_kernel_bit_for_bit(dtype):
    """aim_ssu_warps (every warp its own run of slices, a ring of quarter slices; the AiM shape) writes exactly
    the bits of aim_selective_state_update: y, the sums of squares, the x conv windows and the state, at 1-40
    rows, one slice per warp or runs crossing rows, groups (ngroups 4) and the ring, in place (where the B/C
    windows, left to the next kernel, must stay as they were) and ping-pong."""
    from aim_rt.plugins.kernels import Kernels

    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    block, warps = Kernels(name), Kernels(name, defines={"SSU_WARP_ROWS": 1})
    for cfg in (aim_rt.preset("AiM-B"), aim_rt.AiMConfig(d_model=768, n_layer=1, ngroups=4)):
        for rows, max_blocks in ((1, None), (3, 1), (8, 5), (40, None), (40, 7)):
            x0 = _ssu_inputs(cfg, rows=rows, dtype=dtype, g=torch.Generator().manual_seed(rows))
            for in_place in (True, False):
                got = {}
                for label, k in (("block", block), ("warps", warps)):
                    k.ssu_max_blocks = max_blocks
                    x = {key: v.clone() for key, v in x0.items()}
                    (g_w, sumsq), conv, ssm = run_ssu_kernel(k, cfg, x, in_place, finish=False)
                    got[label] = [g_w, sumsq, conv if in_place else conv[:, :cfg.d_inner], ssm]
                p, _ = ssu_params_for(cfg, x0)
                assert warps.ssu_launch(p)[0] == "aim_ssu_warps" and block.ssu_launch(p)[0] != "aim_ssu_warps"
                for field, a, b in zip(["y", "sumsq", "conv_state", "ssm_state"], got["warps"], got["block"]):
                    assert torch.equal(a, b), (field, cfg.ngroups, rows, max_blocks, in_place)
                if in_place:  # the B/C windows untouched
                    assert torch.equal(got["warps"][2][:, cfg.d_inner:], x0["conv_state"][:, cfg.d_inner:])
    # other shapes keep the block kernel
    small = aim_rt.AiMConfig(d_model=256, n_layer=1, d_state=64, headdim=32)
    p, _ = ssu_params_for(small, _ssu_inputs(small, 4, dtype, torch.Generator()))
    assert warps.ssu_launch(p)[0] == "aim_selective_state_update"


@needs_gpu
def test_gemm_rows_follow_the_model_build():
    """The backend's products run through aim_gemm exactly for the rows measured best for the model's width
    (model_defines), through aim_gemv below (its wide column tiles from the rows measured best) and cuBLAS
    above."""
    from aim_rt.plugins.kernels import Kernels

    xl = Kernels("bfloat16", gemv_depths=(1536, 3072), d_model=1536)
    if not xl.gemms:
        pytest.skip("aim_gemm needs a Hopper GPU (sm_90+): clusters and distributed shared memory")
    b = Kernels("bfloat16", gemv_depths=(768, 1536), d_model=768)
    assert [r for r in range(1, 200) if xl.gemm_supported(r, 1536)] == list(range(3, 65))
    # the folded out_proj from 3 to 128 rows (AiM-XL: GEMM_FOLD_MAX_ROWS), where it has a folded instance
    assert [r for r in range(1, 200) if xl.gemm_supported(r, 3072, folded=True)] == list(range(3, 129))
    assert [r for r in range(1, 200) if xl.fold_supported(r, 3072, 1536)] == list(range(1, 129))
    assert [r for r in range(1, 200) if b.fold_supported(r, 1536, 768)] == list(range(1, 129))
    assert [r for r in range(1, 200) if b.gemm_supported(r, 768)] == list(range(33, 129))
    assert (xl.gemv_narrow_rows, b.gemv_narrow_rows) == (8, 16)  # aim_gemv's wide tiles from 9 / 17 rows
    assert (xl.ssu_warp_rows, b.ssu_warp_rows) == (64, 96)  # the state update's warp kernel from these rows
    assert not b.gemm_supported(64, 96)  # k not a multiple of the 64-deep chunk


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3352, 768), (768, 1536), (6448, 1536), (1536, 3072), (16384, 768), (200, 128),
                                   (203, 128)])
def test_gemm_matches_reference(shape, dtype):
    """aim_gemm (1-128 rows, Hopper): each k-split cluster's product matches float32 to the output's rounding;
    repeated runs give the same bits; a row's bits do not depend on the other rows or their number (the m-tile
    count does not change the order of the sums). 203 columns: output rows that are not 8-byte aligned (the
    scalar stores) and a partial last tile."""
    from aim_rt.plugins.kernels import Kernels, gemm_params, gemm_splits

    kernels = Kernels("bfloat16" if dtype == torch.bfloat16 else "float16")
    if not kernels.gemms:
        pytest.skip("aim_gemm needs a Hopper GPU (sm_90+): clusters and distributed shared memory")
    n, k = shape
    g = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to("cuda", dtype)
    x_all = torch.randn(128, k, generator=g).to("cuda", dtype)
    stream = torch.cuda.current_stream().cuda_stream
    splits, first = gemm_splits(n, k, kernels.num_sms), None
    for rows in (128, 100, 65, 64, 33, 32, 17, 1):  # most rows first: the others' bits are compared with them
        x = x_all[:rows]
        y = torch.full((rows, n), float("nan"), device="cuda", dtype=dtype)
        kernels.gemm(gemm_params(x, w, y, splits), stream)
        torch.cuda.synchronize()
        ref = x.float() @ w.float().t()
        assert rel_err(y, ref) <= 1e-2, (rows, rel_err(y, ref))
        y2 = torch.empty_like(y)
        kernels.gemm(gemm_params(x, w, y2, splits), stream)
        torch.cuda.synchronize()
        assert torch.equal(y, y2), rows
        first = y if first is None else first
        assert torch.equal(y, first[:rows]), rows  # a row's bits whatever the row count


@needs_gpu
@pytest.mark.parametrize("d_conv", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssu_kernel_other_conv_widths(d_conv, dtype):
    """Conv windows of 4, 6, 8 and 12 bytes: copied by cp.async where the size allows, else element by element."""
    from aim_rt.plugins.kernels import Kernels

    cfg = aim_rt.AiMConfig(d_model=256, n_layer=1, d_conv=d_conv, d_state=64, headdim=32)
    kernels = Kernels("float32" if dtype == torch.float32 else "bfloat16")
    kernels.ssu_max_blocks = 4  # runs of several slices
    for in_place in (True, False):
        x = _ssu_inputs(cfg, rows=3, dtype=dtype, g=torch.Generator().manual_seed(d_conv))
        ref = ops.selective_state_update(*[t.clone() for t in x.values()], headdim=cfg.headdim,
                                       d_state=cfg.d_state, ngroups=cfg.ngroups, eps=cfg.norm_eps)
        for name, r, o in zip(["y", "conv_state", "ssm_state"], ref, run_ssu_kernel(kernels, cfg, x, in_place)):
            assert rel_err(o, r) <= TOLS[dtype], (name, in_place, rel_err(o, r))


@needs_gpu
def test_sampling_kernel_matches_reference_draw():
    """Random logits, official settings: the kernel's tokens equal the reference draw (same seeds, same step)."""
    from aim_rt.cuda_backend import CudaBackend

    cfg = aim_rt.AiMConfig(d_model=64, n_layer=1, vocab_size=16384, num_classes=10, num_tokens=16, d_state=32,
                           headdim=32)
    backend = CudaBackend(aim_rt.random_model(cfg, device="cuda"))
    batch = 64
    buf = backend._alloc(batch)
    g = torch.Generator().manual_seed(1)
    agree, total = 0, 0
    for settings in (SamplingSettings(), SamplingSettings(top_k=0, top_p=0.9, temperature=0.7),
                     SamplingSettings(top_k=50, top_p=1.0, cfg_scale=1.5)):
        backend._mode = (False, True)
        buf.mixed = torch.zeros(batch, cfg.vocab_size, device="cuda")
        for step in range(4):
            buf.logits.copy_(3 * torch.randn(2 * batch, cfg.vocab_size, generator=g))
            buf.seeds.copy_(torch.arange(batch) * 7 + 1)
            buf.step.fill_(step)
            backend._sample(buf, settings, torch.cuda.current_stream().cuda_stream)
            torch.cuda.synchronize()
            ref_mixed = ops.cfg_mix(buf.logits[:batch], buf.logits[batch:], settings.cfg_scale, settings.temperature)
            assert rel_err(buf.mixed, ref_mixed) < 1e-6
            ref = draw(ref_mixed.cpu(), buf.seeds.cpu(), step, settings)
            agree += int((buf.tokens[:, step].cpu() == ref).sum())
            total += batch
    assert agree / total >= 0.99, agree / total


@needs_gpu
def test_teacher_forced_logits_over_all_steps_and_token_agreement():
    """fp32: the cuda backend's CFG logits for all 256 steps vs the reference sampler_logits; same seeds → same
    tokens."""
    from aim_rt.cuda_backend import CudaBackend

    model = aim_rt.random_model("AiM-B", seed=0, device="cuda")
    backend = CudaBackend(model)
    classes = torch.tensor([3, 999])
    settings = SamplingSettings(cfg_scale=5.0, top_k=600, top_p=0.98)
    seeds = torch.tensor([1, 2])
    tokens = sample_tokens(model, classes, seeds, settings)
    drawn, mixed = backend.sample(classes, seeds, settings, teacher=tokens, return_mixed=True)
    ref = sampler_logits(model, classes, tokens, 5.0)
    assert rel_err(mixed, ref.cuda()) <= 1e-4
    # draws on teacher-forced logits: no autoregressive divergence, so agreement is per token
    ref_draws = torch.stack([draw(ref[:, k].cpu(), seeds, k, settings) for k in range(256)], dim=1)
    assert (drawn == ref_draws).float().mean() >= 0.99
    assert torch.equal(ref_draws, tokens)  # the reference's own draws reproduce its tokens


@needs_gpu
def test_cudnn_warmup_runs_beside_the_model_build_and_is_joined_before_capture():
    """precompile starts loading cuDNN in a background thread (once per device); CudaBackend waits for it before
    it captures a graph, and the decoder's convolutions then work."""
    from aim_rt import cuda_backend
    from aim_rt.cuda_backend import CudaBackend, precompile

    cfg = aim_rt.AiMConfig(d_model=64, n_layer=1, vocab_size=64, num_classes=5, num_tokens=16, d_state=16, headdim=16)
    precompile(cfg, "bfloat16", "cuda")
    thread = cuda_backend._CUDNN_THREADS[torch.cuda.current_device()]
    precompile(cfg, "bfloat16", "cuda")
    assert cuda_backend._CUDNN_THREADS[torch.cuda.current_device()] is thread  # started once
    backend = CudaBackend(aim_rt.random_model(cfg, seed=0, device="cuda", dtype="bfloat16"))
    assert not thread.is_alive()
    x = torch.randn(1, 8, 8, 8, device="cuda").to(torch.bfloat16, memory_format=torch.channels_last)
    w = torch.randn(8, 8, 3, 3, device="cuda").to(torch.bfloat16, memory_format=torch.channels_last)
    got = torch.nn.functional.conv2d(x, w, padding=1).float()
    assert rel_err(got, torch.nn.functional.conv2d(x.float(), w.float(), padding=1)) <= 1e-2
    assert backend.sample([1], [2], SamplingSettings()).shape == (1, 16)


@needs_gpu
def test_bf16_backend_against_reference_and_vq_decode():
    from aim_rt.cuda_backend import CudaBackend

    cfg = aim_rt.AiMConfig(d_model=256, n_layer=4, vocab_size=1024, num_classes=10, num_tokens=64, adaln_group=True,
                           num_groups=2)
    model = aim_rt.random_model(cfg, seed=2, device="cuda", dtype="bfloat16")
    ref32 = aim_rt.random_model(cfg, seed=2, device="cuda")
    backend = CudaBackend(model)
    settings = SamplingSettings(cfg_scale=3.0, top_k=100, top_p=0.95)
    tokens = sample_tokens(ref32, list(range(8)), list(range(8)), settings)
    _, mixed = backend.sample(list(range(8)), list(range(8)), settings, teacher=tokens, return_mixed=True)
    assert rel_err(mixed, sampler_logits(ref32, torch.arange(8), tokens, 3.0)) <= 5e-2
    # graphs replayed with another batch size and settings still give the eager result
    eager = CudaBackend(model, use_graphs=False).sample([1, 2, 3], [4, 5, 6], settings)
    assert torch.equal(backend.sample([1, 2, 3], [4, 5, 6], settings), eager)
    # several steps per graph (64 = 9 * 7 + 1: the long graph, then the one-step graph), and with a prefix
    assert backend.steps_per_graph > 1
    sevens = CudaBackend(model, steps_per_graph=7)
    assert torch.equal(sevens.sample([1, 2, 3], [4, 5, 6], settings), eager)
    prefix = eager[:, :5]
    assert torch.equal(sevens.sample([1, 2, 3], [4, 5, 6], settings, prefix=prefix),
                       CudaBackend(model, use_graphs=False).sample([1, 2, 3], [4, 5, 6], settings, prefix=prefix))


@needs_gpu
@pytest.mark.parametrize("d_model,gemm_from", [(1024, 24), (1536, 3)])
def test_bf16_backend_of_wide_models_at_aim_gemm_rows_against_reference(d_model, gemm_from):
    """1024- and 1536-wide models (model_defines: aim_gemm from 24 / 3 rows up to 64; the folded out_proj on
    aim_gemm up to 128 rows while in_proj and lm_head run cuBLAS there): teacher-forced CFG logits against the
    float32 reference at 2, 8, 16, 40 and 80 rows, and on Hopper the folded aim_gemm launched exactly from
    `gemm_from` rows."""
    from aim_rt.cuda_backend import CudaBackend

    cfg = aim_rt.AiMConfig(d_model=d_model, n_layer=2, vocab_size=1024, num_classes=40, num_tokens=16)
    model = aim_rt.random_model(cfg, seed=5, device="cuda", dtype="bfloat16")
    ref32 = aim_rt.random_model(cfg, seed=5, device="cuda")
    backend = CudaBackend(model, use_graphs=False)
    folds = []
    launch = backend.kernels.gemm_fold
    backend.kernels.gemm_fold = lambda p, s: (folds.append(p.g.rows), launch(p, s))
    settings = SamplingSettings(cfg_scale=3.0, top_k=100, top_p=0.95)
    for batch in (1, 4, 8, 20, 40):
        classes, seeds = list(range(batch)), list(range(100, 100 + batch))
        tokens = sample_tokens(ref32, classes, seeds, settings)
        folds.clear()
        _, mixed = backend.sample(classes, seeds, settings, teacher=tokens, return_mixed=True)
        assert rel_err(mixed, sampler_logits(ref32, torch.tensor(classes), tokens, 3.0)) <= 5e-2, batch
        if backend.kernels.gemms:
            assert set(folds) == ({2 * batch} if 2 * batch >= gemm_from else set()), batch


@needs_gpu
def test_vq_decode_bf16_graph_against_fp32_reference():
    from aim_rt.cuda_backend import CudaBackend
    from conftest import GOLDEN, golden

    cfg = aim_rt.AiMConfig(d_model=64, n_layer=2, vocab_size=64, num_classes=5, num_tokens=16, d_state=32, headdim=32)
    model = aim_rt.random_model(cfg, device="cuda", dtype="bfloat16")
    aim_rt.loading.attach_vq(model, aim_rt.load_vq(GOLDEN / "vq_small.safetensors"))
    g, _ = golden("vq_small")
    images = CudaBackend(model).decode(g["golden.indices"])
    assert rel_err(images.cpu(), g["golden.images"]) <= 3e-2
    again = CudaBackend(model).decode(g["golden.indices"].flip(0))  # a second replay with new inputs
    assert rel_err(again.cpu(), g["golden.images"].flip(0)) <= 3e-2


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,n", [(768, 3352), (1536, 768), (3072, 1536), (1024, 2088), (256, 1000), (2048, 8)])
def test_gemv_matches_matmul_and_rows_are_independent(dtype, k, n):
    """aim_gemv vs an fp32 product of the same 16-bit operands: at most one rounding of the output apart; a
    row's result is bit-identical whatever the other rows are (batch composition does not change an image), and
    the same through the one-m-tile instances (up to 16 rows) of a build for a 1536-wide model."""
    from aim_rt.plugins.kernels import Kernels, gemv_params, gemv_supported

    name = "bfloat16" if dtype == torch.bfloat16 else "float16"
    builds = {"default": Kernels(name), "d_model 1536": Kernels(name, gemv_depths=(k,), d_model=1536)}
    assert not builds["default"].gemv_m1 and builds["d_model 1536"].gemv_m1 == {k // 256}
    gen = torch.Generator(device="cuda").manual_seed(k + n)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).to(dtype)
    x_all = torch.randn(64, k, device="cuda", generator=gen).to(dtype)
    stream = torch.cuda.current_stream().cuda_stream
    results = {}
    for build, kern in builds.items():
        for rows in (1, 2, 3, 16, 17, 32, 64):  # 17+: wider column tiles (gemv_tiles) where k allows
            if not gemv_supported(name, rows, k):
                assert rows == 64, f"{rows} rows of depth {k} should be supported"
                continue
            x = x_all[:rows].clone()
            y = torch.full((rows, n), float("nan"), device="cuda", dtype=dtype)
            kern.gemv(gemv_params(x, w, y), stream)
            torch.cuda.synchronize()
            ref = x.float() @ w.float().t()
            tol = 2 * ref.abs().clamp_min(1e-3) * (2 ** -8 if dtype == torch.bfloat16 else 2 ** -11) + 1e-5
            diff = (y.float() - ref).abs()
            assert (diff <= tol).all(), f"{build} rows={rows}: max diff {diff.max()}"
            results[build, rows] = y
    most = max(rows for _, rows in results)
    for (build, rows), y in results.items():
        assert torch.equal(y, results["default", most][:rows]), f"{build}: rows {rows} vs {most} of the default"


@needs_gpu
def test_bf16_image_does_not_depend_on_batch_composition():
    """An image's tokens depend on its class and seed only, not on which other images share the batch."""
    from aim_rt.cuda_backend import CudaBackend

    model = aim_rt.random_model("AiM-B", seed=0, device="cuda", dtype="bfloat16")
    backend = CudaBackend(model)
    settings = SamplingSettings()
    alone = backend.sample([207], [11], settings)
    crowd = backend.sample([1, 207, 980, 5, 5], [3, 11, 0, 11, 9], settings)
    assert torch.equal(crowd[1], alone[0])
    big = backend.sample(list(range(100, 112)) + [207], list(range(12)) + [11], settings)  # 26 rows: wide tiles
    assert torch.equal(big[12], alone[0])


def _fold_against_unfolded(kern, rows, d_model, d_inner, heads, gated, gemm, splits, seed):
    """One out_proj (rows x d_inner -> d_model) then the norm kernel, plain and with the residual add folded
    into the product (aim_gemm with `splits` where `gemm`, else aim_gemv): the same residual, normed rows and
    B/C windows, bit for bit; the sum near float32's; the windows shifted as the norm kernel shifts them.
    The fold also hands on to a norming in_proj (gemv_next): the residual times gm rounded, bit for bit, and
    each 8-column tile's sum of squares to float32 accuracy.
    Returns the last NormParams and tensors (for the callers' error checks)."""
    from aim_rt.cuda_backend import _summed
    from aim_rt.plugins.kernels import (ConvShift, NormParams, gemm_fold_params, gemm_params, gemv_fold_params,
                                        gemv_next, gemv_params)

    d_state, width = 64, 4
    conv_dim = d_inner + 2 * d_state
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, scale=1.0: (scale * torch.randn(*s, device="cuda", generator=gen))  # noqa: E731
    bf = torch.bfloat16
    w_out = (r(d_model, d_inner) / d_inner ** 0.5).to(bf)
    norm_w = (1 + r(d_model, scale=0.1)).to(bf)
    stream = torch.cuda.current_stream().cuda_stream
    y = r(rows, d_inner).to(bf)
    mods = r(rows, 3, d_model, scale=0.3).to(bf)  # shift, scale, and (as the gate) the previous layer's
    sumsq = r(rows, heads).abs() * d_inner / heads
    xbc, conv0 = r(rows, conv_dim).to(bf), r(rows, conv_dim, width).to(bf)
    residual0 = r(rows, d_model)
    gm = 1 + r(rows, d_model, scale=0.3)
    xg = torch.full((rows, d_model), float("nan"), device="cuda", dtype=bf)
    sq_part = torch.full((rows, d_model // 8), float("nan"), device="cuda")
    results = []
    for folded in (False, True):
        residual, conv = residual0.clone(), conv0.clone()
        out = torch.zeros(rows, d_model, device="cuda", dtype=bf)
        normed = torch.full((rows, d_model), float("nan"), device="cuda", dtype=bf)
        p = NormParams(
            input=out.data_ptr(), input_stride=out.stride(0), gate=mods[:, 2].data_ptr() if gated else None,
            gate_stride=mods.stride(0), sumsq=sumsq.data_ptr(), sumsq_heads=heads, sumsq_count=d_inner,
            bc=ConvShift(xbc=xbc.data_ptr(), xbc_stride=xbc.stride(0), state_in=conv.data_ptr(),
                         state_out=conv.data_ptr(), first=d_inner, count=2 * d_state, conv_dim=conv_dim,
                         width=width),
            residual=residual.data_ptr(), norm_w=norm_w.data_ptr(), norm2_w=None, shift=mods[:, 0].data_ptr(),
            scale=mods[:, 1].data_ptr(), mod_stride=mods.stride(0), out=normed.data_ptr(),
            out_stride=normed.stride(0), rows=rows, d=d_model, first=0, eps=1e-5)
        if folded and gemm:
            kern.gemm_fold(gemm_fold_params(y, w_out, out, splits, p, gemv_next(xg, gm, sq_part)), stream)
        elif folded:
            kern.gemv_fold(gemv_fold_params(y, w_out, out, p, gemv_next(xg, gm, sq_part)), stream)
        elif gemm:
            kern.gemm(gemm_params(y, w_out, out, splits), stream)
        else:
            kern.gemv(gemv_params(y, w_out, out), stream)
        kern.residual_norm(_summed(p) if folded else p, stream)
        torch.cuda.synchronize()
        results.append((residual, normed, conv))
    what = f"rows {rows}, width {d_model} (aim_gemm: {gemm}, splits {splits})"
    for a, b, part in zip(*results, ("residuals", "normed rows", "conv windows")):
        assert torch.equal(a, b), f"{what}: {part} differ"
    g = mods[:, 2].float() if gated else 1.0
    scale = torch.rsqrt(sumsq.sum(1, keepdim=True) / d_inner + 1e-5)
    want = residual0 + (y.float() @ w_out.float().t()).to(bf).float() * scale * g
    assert rel_err(results[0][0], want) <= 1e-2, what
    shifted = torch.cat([conv0[:, d_inner:, 1:], xbc[:, d_inner:, None]], dim=2)
    assert torch.equal(results[1][2][:, d_inner:], shifted), what
    assert torch.equal(results[1][2][:, :d_inner], conv0[:, :d_inner]), what
    res = results[1][0]
    assert torch.equal(xg, (res * gm).to(bf)), what
    assert rel_err(sq_part, res.pow(2).view(rows, -1, 8).sum(2)) <= 1e-6, what
    return p, y, w_out, out


@needs_gpu
@pytest.mark.parametrize("d_model,gated,heads", [(768, True, 24), (1536, True, 48), (256, False, 80), (128, True, 4),
                                                 (768, True, 48)])
def test_folded_residual_add_gives_the_norm_kernels_bits(d_model, gated, heads):
    """out_proj with the residual add folded in (aim_gemv_resid_* up to FOLD_ROWS: 16 rows, 32 below d_model
    1024; aim_gemm_resid_* where out_proj is an aim_gemm), then the norm kernel norming the summed residual,
    against a plain out_proj and the whole norm kernel, at 1 to 128 rows (every instance): the same residual
    and normed rows, bit for bit, and the B/C windows shifted as the norm kernel shifts them. aim_gemv's rows
    past FOLD_ROWS, and cuBLAS's, are not folded. (80 heads: the gated norm's sums past the first 64 heads; 48:
    a lane's second head in the sums the wide tiles hold across the products; width 128: at 32 rows the
    wide-tile instance has more windows to shift than threads, past those it holds.)"""
    from aim_rt.plugins.kernels import Kernels, gemm_fold_params, gemm_splits, gemv_fold_params

    d_inner = 2 * d_model
    kern = Kernels("bfloat16", gemv_depths=(d_model, d_inner), d_model=d_model,
                   defines={"FOLD_GEMM": 2} if d_model == 768 else None)
    folding = [rows for rows in (1, 2, 5, 8, 9, 16, 17, 32, 33, 64, 100, 128)
               if kern.fold_supported(rows, d_inner, d_model)]
    want = [1, 2, 5, 8, 9, 16] + ([17, 32] if d_model < 1024 else [])  # aim_gemv up to FOLD_ROWS (model_defines)
    if kern.gemms:  # Hopper: aim_gemm's rows (model_defines: from 3 at 1536, else from 33) fold too, in the
        # instances compiled: every one at 768 (FOLD_GEMM 2), at 1536 (its build: FOLD_GEMM_M2 / _M8, the
        # folded out_proj on aim_gemm to 128 rows), the 64- and 128-row ones below 1024 (FOLD_GEMM_M8)
        want += [17, 32, 33, 64, 100, 128] if d_model == 1536 else [33, 64, 100, 128]
        # (at 1536, rows 5-16 fold too, on aim_gemm_resid_m2 instead of aim_gemv_resid)
    assert folding == want
    for rows in folding:
        gemm = kern.gemm_supported(rows, d_inner, folded=True)
        splits = gemm_splits(d_model, d_inner, kern.gemm_fold_ctas)  # as the backend splits the folded out_proj
        p, y, w_out, out = _fold_against_unfolded(kern, rows, d_model, d_inner, heads, gated, gemm, splits,
                                                  seed=d_model + rows)
    with pytest.raises(aim_rt.plugins.kernels.KernelError, match="rows x width"):
        gemv_fold_params(y[:1], w_out, out[:1], p)
    with pytest.raises(aim_rt.plugins.kernels.KernelError, match="rows x width"):
        gemm_fold_params(y[:1], w_out, out[:1], 1, p)


@needs_gpu
@pytest.mark.parametrize("d_model,d_inner", [(768, 1536), (352, 1536)])
def test_folded_gemm_epilogue_at_every_split_and_a_partial_column_tile(d_model, d_inner):
    """aim_gemm's folded epilogue at k splits 1, 2, 4 and 8 (a CTA finishes every 16-row block, or every 2nd,
    4th or 8th) and where the last 64-column tile is partial (width 352): the unfolded pair's bits."""
    from aim_rt.plugins.kernels import Kernels

    kern = Kernels("bfloat16", gemv_depths=(d_inner,), d_model=d_model, defines={"FOLD_GEMM": 2})
    if not kern.gemms:
        pytest.skip("aim_gemm needs Hopper (sm_90)")
    for rows in (17, 33, 64, 100, 128):
        for splits in (1, 2, 4, 8):
            _fold_against_unfolded(kern, rows, d_model, d_inner, 24, True, True, splits, seed=rows + splits)


@needs_gpu
def test_backend_folds_the_residual_add_at_few_rows_with_the_same_tokens():
    """Where out_proj is an aim_gemv up to Kernels.fold_rows rows, or an aim_gemm (Hopper), the cuda backend
    folds the residual add between layers into out_proj, with the unfolded step's tokens and mixed logits, bit
    for bit."""
    from aim_rt.cuda_backend import CudaBackend

    cfg = aim_rt.AiMConfig(d_model=256, n_layer=4, vocab_size=1024, num_classes=10, num_tokens=64)
    model = aim_rt.random_model(cfg, seed=3, device="cuda", dtype="bfloat16")
    settings = SamplingSettings(cfg_scale=3.0, top_k=100, top_p=0.95)
    plain, folded = CudaBackend(model), CudaBackend(model, use_graphs=False)
    plain.kernels.fold_rows, plain.kernels.gemm_resids = 0, {}
    # (in_proj norming its x rounds otherwise)
    folded.kernels.fold_rows, folded.kernels.norm_fold_rows, folded.kernels.gemm_norms = 8, 0, {}
    calls = []
    for kind in ("gemv_fold", "gemm_fold"):
        launch = getattr(folded.kernels, kind)
        setattr(folded.kernels, kind, lambda p, s, launch=launch, kind=kind: (calls.append((kind, p.g.rows)),
                                                                               launch(p, s)))
    # 2 and 8 rows fold (aim_gemv); 10 do not; 34 do where aim_gemm runs them (Hopper)
    for batch in (1, 4, 5, 17):
        classes, seeds = [c % cfg.num_classes for c in range(batch)], list(range(10, 10 + batch))
        calls.clear()
        t_p, m_p = plain.sample(classes, seeds, settings, return_mixed=True)
        t, m = folded.sample(classes, seeds, settings, return_mixed=True)
        assert torch.equal(t, t_p) and torch.equal(m, m_p), batch
        rows = 2 * batch
        kind = ("gemm_fold" if folded.kernels.gemm_supported(rows, cfg.d_inner, folded=True) and folded.kernels.gemms
                else "gemv_fold" if rows <= 8 else None)
        folds = cfg.n_layer * cfg.num_tokens if kind else 0  # eager: one launch per call
        assert calls == [(kind, rows)] * folds, batch
        if folded.kernels.gemms:
            assert (kind == "gemm_fold") == (batch == 17), batch


def _normed_in_proj_against_its_formula(kern, d_model, n, all_rows, gemm):
    """in_proj with the residual norm folded in (aim_gemm_norm_* with the backend's k split where `gemm`, else
    aim_gemv_norm_*) at each of `all_rows`, fed x * gm rounded and the tile sums of squares as out_proj hands
    them on, and W shift from its own bias mode (to float32 accuracy): the formula W (x * gm) / rms(x) + W shift
    computed in float64, to one rounding of its bf16 output; the separate norm's product (normed row rounded as
    the norm kernel rounds it) to bf16 accuracy; and each row's bits the same at every row count and instance."""
    from aim_rt.plugins.kernels import (gemm_norm_bias_params, gemm_norm_params, gemm_splits, gemv_norm_bias_params,
                                        gemv_norm_params)

    gen = torch.Generator(device="cuda").manual_seed(d_model)
    bf, eps, most = torch.bfloat16, 1e-5, max(all_rows)
    w = (torch.randn(n, d_model, device="cuda", generator=gen) / d_model ** 0.5).to(bf)
    res = 3 * torch.randn(most, d_model, device="cuda", generator=gen)
    norm_w = (1 + 0.2 * torch.randn(d_model, device="cuda", generator=gen)).to(bf)
    scale = (0.3 * torch.randn(most, d_model, device="cuda", generator=gen)).to(bf)
    shift = (0.5 * torch.randn(most, d_model, device="cuda", generator=gen)).to(bf)
    gm = norm_w.float() * (1 + scale.float())
    stream = torch.cuda.current_stream().cuda_stream
    splits = gemm_splits(n, d_model, kern.gemm_ctas)  # as the backend splits in_proj
    results = {}
    for rows in all_rows:
        assert kern.norm_fold_supported(rows, d_model), rows
        assert kern.gemm_supported(rows, d_model) == gemm, rows
        y = torch.full((rows, n), float("nan"), device="cuda", dtype=bf)
        xg = (res[:rows] * gm[:rows]).to(bf)  # as the folded out_proj hands them on (gemv_next)
        sq_part = res[:rows].pow(2).view(rows, -1, 8).sum(2)
        bias = torch.full((rows, n), float("nan"), device="cuda")
        if gemm:
            kern.gemm_norm(gemm_norm_bias_params(shift[:rows], w, bias, splits), stream)
            kern.gemm_norm(gemm_norm_params(xg, sq_part, bias, w, y, splits, eps), stream)
        else:
            kern.gemv_norm(gemv_norm_bias_params(shift[:rows], w, bias), stream)  # once per sample, at the prefill
            kern.gemv_norm(gemv_norm_params(xg, sq_part, bias, w, y, eps), stream)
        torch.cuda.synchronize()
        x, W = res[:rows].double(), w.double()
        exact = shift[:rows].double() @ W.t()
        assert ((bias.double() - exact).abs() <= 1e-5 * (shift[:rows].double().abs() @ W.abs().t())).all(), rows
        inv = torch.rsqrt(x.pow(2).mean(1, keepdim=True) + eps)
        a = (res[:rows] * gm[:rows]).to(bf).double()
        want = inv * (a @ W.t()) + shift[:rows].double() @ W.t()
        size = inv * (a.abs() @ W.abs().t()) + shift[:rows].double().abs() @ W.abs().t()
        diff = (y.double() - want).abs()
        assert (diff <= 2 ** -8 * want.abs() + 1e-5 * size).all(), f"rows={rows}: max diff {diff.max()}"
        normed = ((res[:rows] * inv.float()).mul(norm_w.float()).to(bf).float() * (1 + scale[:rows].float())
                  + shift[:rows].float()).to(bf)
        assert rel_err(y.float(), normed.float() @ w.float().t()) <= 1e-2, rows
        results[rows] = y, bias
    for rows, (y, bias) in results.items():
        assert torch.equal(y, results[most][0][:rows]) and torch.equal(bias, results[most][1][:rows]), rows


@needs_gpu
@pytest.mark.parametrize("d_model,n", [(768, 3352), (1536, 1000)])
def test_normed_in_proj_matches_its_formula_and_the_norm_kernels_product(d_model, n):
    """aim_gemv_norm_* at 1 to 32 rows: every instance, the one-m-tile one of a 1536-wide build included
    (_normed_in_proj_against_its_formula)."""
    from aim_rt.plugins.kernels import Kernels

    kern = Kernels("bfloat16", gemv_depths=(d_model,), d_model=d_model,
                   defines={"NORM_FOLD_ROWS": 32, "GEMM_MIN_ROWS": 129})  # aim_gemv at every row count here
    _normed_in_proj_against_its_formula(kern, d_model, n, (1, 2, 3, 8, 9, 16, 17, 32), gemm=False)


@needs_gpu
@pytest.mark.parametrize("d_model,n", [(768, 3352), (1536, 6448)])
def test_gemm_normed_in_proj_matches_its_formula_and_the_norm_kernels_product(d_model, n):
    """aim_gemm_norm_* (Hopper, every instance built) on the rows each model's build gives aim_gemm (AiM-B 33-128:
    m4, m8; AiM-XL 3-64: m2, m4) (_normed_in_proj_against_its_formula)."""
    from aim_rt.plugins.kernels import Kernels

    kern = Kernels("bfloat16", gemv_depths=(d_model,), d_model=d_model, defines={"GEMM_NORM": 2 | 4 | 8})
    if not kern.gemms:
        pytest.skip("aim_gemm needs Hopper (sm_90)")
    rows = (33, 40, 64, 65, 128) if d_model == 768 else (3, 17, 32, 33, 64)
    _normed_in_proj_against_its_formula(kern, d_model, n, rows, gemm=True)


@needs_gpu
@pytest.mark.parametrize("d_model", [256, 1024, 1536])
def test_backend_norms_in_proj_after_the_first_layer_as_faithfully_as_the_separate_norm(monkeypatch, d_model):
    """Where Kernels.norm_fold_rows reaches (AIM_RT_NORM_FOLD; width 256: batch 1-16 on aim_gemv), and on aim_gemm's
    rows (Hopper; d_model 1536: batch 2-32; 1024: batch 12-16), every layer after the first runs in_proj on its own
    norm of the residual (one launch per layer less; the prefill makes each layer's W shift). Against the same
    model in float32, teacher-forced on the same tokens, its CFG-mixed logits and draws are as close
    as the separate norm's (the products' inputs round at another point, so the bf16 bits differ;
    scripts/norm_fold_fidelity.py measured 1.7e-2 against 1.7e-2 here, draws 78 % against 78 %)."""
    from aim_rt.cuda_backend import CudaBackend

    cfg = aim_rt.AiMConfig(d_model=d_model, n_layer=4 if d_model == 256 else 2, vocab_size=1024, num_classes=10,
                           num_tokens=64)
    model = aim_rt.random_model(cfg, seed=5, device="cuda", dtype="bfloat16")
    monkeypatch.setenv("AIM_RT_NORM_FOLD", "0")
    plain = CudaBackend(model)
    if d_model >= 1024 and not plain.kernels.gemms:
        pytest.skip("aim_gemm needs Hopper (sm_90)")
    f32 = CudaBackend(aim_rt.random_model(cfg, seed=5, device="cuda", dtype="float32"))
    settings = SamplingSettings(cfg_scale=3.0, top_k=100, top_p=0.95)
    if d_model == 256:
        monkeypatch.setenv("AIM_RT_NORM_FOLD", "32")
    else:  # the build's own rule (GEMM_NORM_ON)
        monkeypatch.delenv("AIM_RT_NORM_FOLD")
    normed = CudaBackend(model, use_graphs=False)
    calls = []
    for kind in ("gemv_norm", "gemm_norm"):
        launch = getattr(normed.kernels, kind)
        setattr(normed.kernels, kind, lambda p, s, launch=launch, kind=kind: (
            calls.append((kind, p.g.rows, bool(p.bias_out))), launch(p, s)))
    for batch in {256: (1, 4, 16), 1024: (12, 16), 1536: (2, 8)}[d_model]:
        classes, seeds = [c % cfg.num_classes for c in range(batch)], list(range(20, 20 + batch))
        assert plain.norm_folds(2 * batch) is False and normed.norm_folds(2 * batch) is True
        tokens = plain.sample(classes, seeds, settings)
        draws_p, mixed_p = plain.sample(classes, seeds, settings, teacher=tokens, return_mixed=True)
        draws_f, mixed_f = f32.sample(classes, seeds, settings, teacher=tokens, return_mixed=True)
        calls.clear()
        draws, mixed = normed.sample(classes, seeds, settings, teacher=tokens, return_mixed=True)
        # the prefill makes each layer's W shift (bias mode), then every step norms in_proj's x after layer 0
        kind = "gemv_norm" if d_model == 256 else "gemm_norm"
        assert calls == [(kind, 2 * batch, True)] * (cfg.n_layer - 1) + [(kind, 2 * batch, False)] * (
            (cfg.n_layer - 1) * cfg.num_tokens), batch
        # (the two bf16 roundings apart: at width 1024, H100, 2.4e-2, each 1.3-1.4e-2 from float32's)
        assert rel_err(mixed, mixed_p) <= 3e-2, batch
        assert rel_err(mixed, mixed_f) <= 1.25 * rel_err(mixed_p, mixed_f) + 1e-3, batch
        agree = lambda a, b: (a == b).float().mean().item()  # noqa: E731
        assert agree(draws, draws_f) >= agree(draws_p, draws_f) - 0.1, batch


def test_ssu_params_rejects_shapes_the_kernel_cannot_take():
    """Every caller (the backend, the TensorRT plugin) goes through ssu_params: bad shapes fail there, by name,
    instead of indexing out of bounds on the device (CPU tensors: only the checks run)."""
    from aim_rt.plugins.kernels import KernelError, ssu_params

    cfg = aim_rt.AiMConfig(d_model=64, n_layer=1, vocab_size=16, num_classes=2, num_tokens=4, d_state=32, headdim=32)
    rows, C = 2, cfg.conv_dim

    def make(d_conv=cfg.d_conv, sumsq_cols=cfg.nheads, headdim=cfg.headdim):
        z = torch.zeros(rows, cfg.d_in_proj)
        w = dict(conv_weight=torch.zeros(C, d_conv), conv_bias=torch.zeros(C), dt_bias=torch.zeros(cfg.nheads),
                 A_log=torch.zeros(cfg.nheads), D=torch.zeros(cfg.nheads), norm_weight=torch.zeros(cfg.d_inner))
        conv = torch.zeros(rows, C, d_conv)
        ssm = torch.zeros(rows, cfg.nheads, cfg.headdim, cfg.d_state)
        d_in, d_x = cfg.d_inner, cfg.d_inner + C
        return ssu_params(xbc=z[:, d_in:d_x], z=z[:, :d_in], dt=z[:, d_x:], conv_state_in=conv, conv_state_out=conv,
                          ssm_state_in=ssm, ssm_state_out=ssm, weights=w, sumsq=torch.zeros(rows, sumsq_cols),
                          y=torch.zeros(rows, cfg.d_inner), headdim=headdim, d_state=cfg.d_state, ngroups=1, eps=1e-5)

    assert make().rows == rows
    with pytest.raises(KernelError, match="d_conv"):
        make(d_conv=5)
    with pytest.raises(KernelError, match="sumsq"):
        make(sumsq_cols=cfg.nheads + 1)
    with pytest.raises(KernelError, match="headdim"):
        make(headdim=16)


@needs_gpu
def test_backend_with_the_warp_state_update_gives_the_same_tokens():
    """The cuda backend with aim_ssu_warps from 1 row (Kernels.ssu_warp_rows) samples the tokens and mixed
    logits of the block kernel's step, bit for bit, at 2-34 rows; the warp kernel is what ran."""
    from aim_rt.cuda_backend import CudaBackend

    cfg = aim_rt.AiMConfig(d_model=256, n_layer=3, vocab_size=1024, num_classes=10, num_tokens=49)
    model = aim_rt.random_model(cfg, seed=5, device="cuda", dtype="bfloat16")
    settings = SamplingSettings(cfg_scale=3.0, top_k=100, top_p=0.95)
    plain, warps = CudaBackend(model), CudaBackend(model)
    warps.kernels.ssu_warp_rows = 1
    names = []
    launch = warps.kernels._launch
    warps.kernels._launch = lambda name, *a: (names.append(name), launch(name, *a))
    for batch in (1, 4, 17):
        classes, seeds = [c % cfg.num_classes for c in range(batch)], list(range(batch))
        names.clear()
        t_p, m_p = plain.sample(classes, seeds, settings, return_mixed=True)
        t, m = warps.sample(classes, seeds, settings, return_mixed=True)
        assert torch.equal(t, t_p) and torch.equal(m, m_p), batch
        assert "aim_ssu_warps" in names and "aim_selective_state_update" not in names, batch


@needs_gpu
def test_op_timings_attribute_the_replayed_step_to_its_kinds():
    """`aim-rt bench --kernels`' in-step column: every kind's share of the replayed step, adding up to it."""
    from aim_rt.cuda_backend import CudaBackend

    cfg = aim_rt.AiMConfig(d_model=64, n_layer=2, vocab_size=64, num_classes=5, num_tokens=16, d_state=16, headdim=16)
    backend = CudaBackend(aim_rt.random_model(cfg, seed=0, device="cuda", dtype="bfloat16"))
    settings = SamplingSettings()
    backend.sample([1, 2], [3, 4], settings)  # captures the graphs the timeline replays
    timing = backend.op_timings(2, settings, reps=2, min_launches=4)
    tl = timing["timeline"]
    in_step = tl["in_step_us_per_launch"]
    assert set(in_step) == set(timing["ops"]) and all(v >= 0 for v in in_step.values())
    # what the kinds add, per step, is the replayed span per step (less the first kernel's own time)
    added = sum(in_step[k] * t["launches_per_step"] for k, t in timing["ops"].items())
    assert added == pytest.approx(tl["span_us_per_step"], rel=0.25)
    assert tl["kernels"] == timing["kernels_per_step"]
