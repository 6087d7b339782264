"""The `cuda` backend: the fused step kernels of plugins/aim_kernels.cu (products: aim_gemv, or cuBLAS), and the
decode loop replayed from a CUDA graph, with sampling on the device (no host round trip per token).

Per step and layer: residual+RMSNorm+modulate (1 kernel) → in_proj product → fused selective-state update (1
kernel, state streamed once, updated in place) → out_proj product. The products of 16-bit models are aim_gemv
(tensor-core, weights read once) for few rows, on Hopper aim_gemm (split-k cluster GEMM) above them, and cuBLAS
beyond; where each starts is measured per model width (plugins/kernels.py, model_defines). On Hopper every
kernel of ours is launched with programmatic dependent launch: it starts while its predecessor runs and reads
what does not depend on it (weights, its layer's state) before waiting for it (PDL_WAIT in aim_kernels.cu).
With one group (every AiM model) the gated RMSNorm's 1/rms is a per-row scalar that factors out of out_proj,
so the next residual-norm kernel applies it (and shifts the B/C conv windows the state update leaves), and the
state update waits for no other block; otherwise a small kernel finishes the op before out_proj. Where out_proj
is one of ours with a folded instance (aim_gemv up to Kernels.fold_rows rows, aim_gemm) that work and the
residual add move into out_proj's epilogue, with the same arithmetic, and the norm kernel only norms the summed
residual (GemvFoldParams, GemmFoldParams in aim_kernels.cu). Then
the final norms, the lm_head product, and one sampling kernel that writes the token and the next step's input
embedding and advances the token index (one per image, on the device). The modulations are computed once per
sequence; the class token is the first replayed step, from the zero state (a prefix goes through the
reference's chunked prefill). Per (batch, settings) one graph holds
a whole step and, up to batch 16, another `steps_per_graph` steps back to back (the token index lives on the
device), so within it the next step's first kernels take their places and fetch their weights while the
sampler runs; the loop replays the long graph, then the one-step graph for the rest.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import AiMError
from .loading import dtype_name
from .decoding import check_request
from .model import AiM, cfg_rows
from .sampling import SamplingSettings
from .vq import VQModel


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _summed(norm):
    """`norm` (NormParams) for a residual that a folded out_proj has already summed: the kernel only norms it."""
    from aim_rt.plugins.kernels import ConvShift, NormParams

    p = NormParams.from_buffer_copy(norm)
    p.input, p.gate, p.sumsq, p.bc = None, None, None, ConvShift()
    return p


def _use_gemv(use_gemv: bool | None) -> bool:
    # False (or AIM_RT_GEMV=0): cuBLAS for every product, to measure what aim_gemv gains
    return os.environ.get("AIM_RT_GEMV", "1") != "0" if use_gemv is None else use_gemv


# Measured on the H200 (bench/results/graph_steps_h200_2026-12-02.*, whole steps, alternating in one process):
# 8 steps per graph against 1: AiM-B -0.6 % per step at batch 1, -0.9 % at 4, -0.8 % at 16, but +0.7 % at 64
# (whose products are cuBLAS kernels, outside the early-launch chain); AiM-XL -0.8 % at 1, -0.2 % at 16. 32
# steps: the same as 8. Hence 8, up to MULTI_STEP_MAX_ROWS rows.
STEPS_PER_GRAPH = 8
MULTI_STEP_MAX_ROWS = 32


def _steps_per_graph(value: int | None) -> int:
    # AIM_RT_STEPS_PER_GRAPH=1: one step per replay, as before (to measure what the longer graph gains)
    return max(1, int(os.environ.get("AIM_RT_STEPS_PER_GRAPH", STEPS_PER_GRAPH) if value is None else value))


def _gemv_depths(cfg) -> tuple[int, ...]:
    return (cfg.d_model, cfg.d_inner)  # in_proj and lm_head; out_proj


def precompile(config, dtype: str, device) -> None:
    """Start compiling every kernel the cuda backend will need for a model of `config` (NVRTC, in background
    threads; the disk cache makes it a no-op the second time), and start loading cuDNN (warm_cudnn). Called
    before the model is built or loaded (by `aim-rt generate` and `bench`), a cold start overlaps both with that;
    CudaBackend and the VQ decoder then wait for them instead of starting their own."""
    from aim_rt.plugins.kernels import kernel_arch, kernel_builds

    from .vq_fast import ELEM_KINDS, compile_vq_async

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return
    major, minor = torch.cuda.get_device_capability(dev)
    arch = kernel_arch(major, minor)
    kernel_builds(dtype, arch, gemv_depths=_gemv_depths(config), d_model=config.d_model)
    if dtype in ELEM_KINDS:  # the 16-bit models' VQ decoder
        compile_vq_async(dtype, arch)
    warm_cudnn(dev, dtype)


# The VQ decoder's convolutions are cuDNN's. Its first use in a process loads cuDNN's libraries and creates a
# handle, which otherwise falls on the first decode, after the tokens. warm_cudnn does that in a background
# thread while the model is built (H200: 0.35 s off a cold start's images, bench/results/cold_start_ab_*_2026-12-03);
# CudaBackend joins it before it captures any graph (a capture must not overlap another thread's CUDA calls).
CUDNN_WARMUP = True  # False: no warm-up (scripts/cold_start.py --no-cudnn-warmup, to measure what it gains)
_CUDNN_THREADS: dict[int, threading.Thread] = {}


def timing_passes(kind: str, launches: int, reps: int, min_launches: int, num_tokens: int) -> int:
    """How many passes over a kind's `launches` per step `op_timings` captures in one graph: at least `reps`, and
    at least `min_launches` launches in all; the sampler's passes each advance the token index, so they stay
    inside the position table (num_tokens - 1)."""
    passes = max(reps, -(-min_launches // launches))
    if kind == "sample":
        passes = min(passes, num_tokens - 1)
    return passes


def _cuda_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def warm_cudnn(device: torch.device, dtype: str) -> None:
    """Start loading cuDNN for `device` in a background thread (once per device; errors are left to the
    decoder's own first convolution)."""
    index = _cuda_index(device)
    if not CUDNN_WARMUP or index in _CUDNN_THREADS:
        return

    def run():
        try:
            with torch.cuda.device(index):
                dt = getattr(torch, dtype)
                x = torch.zeros(1, 8, 8, 8, device="cuda", dtype=dt).to(memory_format=torch.channels_last)
                w = torch.zeros(8, 8, 3, 3, device="cuda", dtype=dt).to(memory_format=torch.channels_last)
                torch.nn.functional.conv2d(x, w, padding=1)
                torch.cuda.current_stream().synchronize()
        except Exception:  # noqa: BLE001 - best effort: the decoder's first convolution reports any real error
            pass

    thread = threading.Thread(target=run, name="aim-rt-cudnn-warmup", daemon=True)
    _CUDNN_THREADS[index] = thread
    thread.start()


def join_cudnn_warmup(device: torch.device) -> None:
    thread = _CUDNN_THREADS.get(_cuda_index(device))
    if thread is not None:
        thread.join()


@dataclass
class _Buffers:
    """Static device buffers of one batch size (addresses baked into the captured graph)."""

    hidden: Tensor      # (R, d) the step's input embeddings
    residual: Tensor    # (R, d) float32
    normed: Tensor      # (R, d)
    zxbcdt: Tensor      # (R, d_in_proj) in_proj output: z | x B C | dt
    out: Tensor         # (R, d) out_proj output
    y: Tensor           # (R, d_inner) mixer output (g * norm_w; normed only when ngroups > 1)
    sumsq: Tensor       # (R, H) float32: each head's sum of squares for the gated RMSNorm
    conv: Tensor        # (L, R, C, W)
    ssm: Tensor         # (L, R, H, P, N)
    mods: Tensor        # (L, R, 3, d)
    gm: Tensor | None   # (L, R, d) float32: norm weight * (1 + scale), once in_proj norms its own x (norm_folds)
    sq_part: Tensor | None  # (R, d / 8) float32: out_proj's column tiles' sums of squares of the residual (same)
    bias: Tensor | None  # (L, R, d_in_proj) float32: in_proj's weight times the shift (same)
    final_mods: Tensor  # (R, 2, d)
    logits: Tensor      # (R, V)
    tokens: Tensor      # (B, num_tokens) int64
    seeds: Tensor       # (B,) int64
    step: Tensor        # (1,) int32: the token index the sampler draws next
    teacher: Tensor | None = None
    mixed: Tensor | None = None


class CudaBackend:
    name = "cuda"

    def __init__(self, model: AiM, use_graphs: bool = True, use_gemv: bool | None = None,
                 steps_per_graph: int | None = None):
        """`use_gemv`: our skinny products (None: unless AIM_RT_GEMV=0). `steps_per_graph`: decode steps in the
        long graph (None: STEPS_PER_GRAPH unless AIM_RT_STEPS_PER_GRAPH is set)."""
        from aim_rt.plugins.kernels import Kernels, check_shapes

        if model.device.type != "cuda":
            raise AiMError("the cuda backend needs the model on a CUDA device (--device cuda)")
        cfg = model.config
        check_shapes(cfg.headdim, cfg.d_state, cfg.d_conv, cfg.ngroups)
        self.model, self.config = model, cfg
        self.dtype = model.dtype
        self.use_graphs = use_graphs
        self.use_gemv = _use_gemv(use_gemv)
        self.steps_per_graph = _steps_per_graph(steps_per_graph)
        if model.vq is not None:  # the VQ decoder's kernels compile meanwhile (no-op if precompile started them)
            precompile(cfg, dtype_name(self.dtype), model.device)
        join_cudnn_warmup(model.device)  # before any graph capture
        self.kernels = Kernels(dtype_name(self.dtype), model.device.index or 0, gemv_depths=_gemv_depths(cfg),
                               d_model=cfg.d_model)
        self._buffers: dict[int, _Buffers] = {}
        self._graphs: dict[tuple, list[tuple[int, torch.cuda.CUDAGraph]]] = {}  # (steps, graph): 1 first
        self._vq = None  # the fast VQ decoder, built on first use
        self._params = self._layer_params()
        self._norm_w = torch.stack([w["norm"].float() for w in self._params])  # (L, d), for norm_folds
        self._mode = (False, False)  # (teacher forcing, record mixed logits): which optional pointers are live

    # ----- one step, as kernel launches -------------------------------------------------------------
    def _layer_params(self):
        out = []
        for blk in self.model.backbone.layers:
            mx = blk.mixer
            out.append(dict(
                norm=blk.norm.weight.contiguous(), in_proj=mx.in_proj.weight.contiguous(),
                out_proj=mx.out_proj.weight.contiguous(),
                ssu=dict(conv_weight=mx.conv1d.weight.contiguous(), conv_bias=mx.conv1d.bias.contiguous(),
                         dt_bias=mx.dt_bias.contiguous(), A_log=mx.A_log.contiguous(), D=mx.D.contiguous(),
                         norm_weight=mx.norm.weight.contiguous())))
        return out

    def _alloc(self, batch: int) -> _Buffers:
        if batch in self._buffers:
            return self._buffers[batch]
        cfg, dev, dt = self.config, self.model.device, self.dtype
        rows = 2 * batch
        buf = _Buffers(
            hidden=torch.zeros(rows, cfg.d_model, device=dev, dtype=dt),
            residual=torch.zeros(rows, cfg.d_model, device=dev),
            normed=torch.zeros(rows, cfg.d_model, device=dev, dtype=dt),
            zxbcdt=torch.zeros(rows, cfg.d_in_proj, device=dev, dtype=dt),
            out=torch.zeros(rows, cfg.d_model, device=dev, dtype=dt),
            y=torch.zeros(rows, cfg.d_inner, device=dev, dtype=dt),
            sumsq=torch.zeros(rows, cfg.nheads, device=dev),
            conv=torch.zeros(cfg.n_layer, rows, cfg.conv_dim, cfg.d_conv, device=dev, dtype=dt),
            ssm=torch.zeros(cfg.n_layer, rows, cfg.nheads, cfg.headdim, cfg.d_state, device=dev, dtype=dt),
            mods=torch.zeros(cfg.n_layer, rows, 3, cfg.d_model, device=dev, dtype=dt),
            gm=None, sq_part=None, bias=None,
            final_mods=torch.zeros(rows, 2, cfg.d_model, device=dev, dtype=dt),
            logits=torch.zeros(rows, cfg.vocab_size, device=dev, dtype=dt),
            tokens=torch.zeros(batch, cfg.num_tokens, device=dev, dtype=torch.long),
            seeds=torch.zeros(batch, device=dev, dtype=torch.long),
            step=torch.zeros(batch, device=dev, dtype=torch.int32),  # per image: the sampler advances its own
        )
        self._buffers[batch] = buf
        return buf

    def _sample_params(self, buf: _Buffers, settings: SamplingSettings):
        from aim_rt.plugins.kernels import SampleParams

        cfg, emb = self.config, self.model.backbone.embeddings
        return SampleParams(
            logits=_ptr(buf.logits), logits_stride=buf.logits.stride(0), batch=buf.seeds.shape[0],
            vocab=cfg.vocab_size, uncond_rows=buf.seeds.shape[0], cfg_scale=settings.cfg_scale, temperature=settings.temperature,
            top_k=settings.top_k, top_p=settings.top_p, seeds=_ptr(buf.seeds), step=_ptr(buf.step),
            position_offset=settings.position_offset, tokens=_ptr(buf.tokens), num_tokens=cfg.num_tokens,
            teacher=_ptr(buf.teacher) if self._mode[0] else None,
            mixed_out=_ptr(buf.mixed) if self._mode[1] else None, word_emb=_ptr(emb.word_embeddings.weight),
            pos_emb=_ptr(emb.position_embeddings.weight), d=cfg.d_model, next_input=_ptr(buf.hidden), next_token=None,
            advance=1)

    def _sample(self, buf: _Buffers, settings: SamplingSettings, stream: int) -> None:
        self.kernels.cfg_sample(self._sample_params(buf, settings), stream)  # and advances buf.step

    def _ops(self, buf: _Buffers, settings: SamplingSettings) -> list[tuple[str, Callable[[], None]]]:
        """One decode step as (kind, launch) pairs in order: from the input embedding to the next token.
        `_step` runs them all (that is what the graph captures); `op_timings` times each kind alone."""
        from aim_rt.plugins.kernels import ConvShift, NormParams, conv_shift_params, ssu_params

        cfg, k, bb = self.config, self.kernels, self.model.backbone
        rows = buf.hidden.shape[0]
        fold_norm = cfg.ngroups == 1  # the gated norm's 1/rms is applied by the next residual norm
        d_in, d_x = cfg.d_inner, cfg.d_inner + cfg.conv_dim
        stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731

        def norm_params(i, inp, gate, norm_w, norm2_w, mods, prev):
            # `prev`: the previous layer's state update, whose norm scale and B/C shift this norm finishes
            return NormParams(
                input=_ptr(inp), input_stride=inp.stride(0), gate=_ptr(gate),
                gate_stride=gate.stride(0) if gate is not None else 0,
                sumsq=_ptr(buf.sumsq) if fold_norm and i > 0 else None, sumsq_heads=cfg.nheads,
                sumsq_count=cfg.d_inner, bc=conv_shift_params(prev) if fold_norm and i > 0 else ConvShift(),
                residual=_ptr(buf.residual), norm_w=_ptr(norm_w), norm2_w=_ptr(norm2_w),
                shift=_ptr(mods[:, 0]), scale=_ptr(mods[:, 1]), mod_stride=mods.stride(0), out=_ptr(buf.normed),
                out_stride=cfg.d_model, rows=rows, d=cfg.d_model, first=int(i == 0), eps=cfg.norm_eps)

        ssus = [ssu_params(
            xbc=buf.zxbcdt[:, d_in:d_x], z=buf.zxbcdt[:, :d_in], dt=buf.zxbcdt[:, d_x:],
            conv_state_in=buf.conv[i], conv_state_out=buf.conv[i], ssm_state_in=buf.ssm[i],
            ssm_state_out=buf.ssm[i], weights=w["ssu"], sumsq=buf.sumsq, y=buf.y,
            headdim=cfg.headdim, d_state=cfg.d_state, ngroups=cfg.ngroups, eps=cfg.norm_eps)
            for i, w in enumerate(self._params)]
        norms = [norm_params(i, buf.hidden if i == 0 else buf.out, buf.mods[i - 1][:, 2] if i else None, w["norm"],
                             None, buf.mods[i], ssus[i - 1] if i else None) for i, w in enumerate(self._params)]
        final = norm_params(len(self._params), buf.out, buf.mods[-1][:, 2], bb.norm_f.weight,
                            bb.final_layer.norm_final.weight, buf.final_mods, ssus[-1])
        # Where Kernels.fold_supported, each out_proj adds its result to the residual (and finishes the state
        # update: GemvFoldParams, GemmFoldParams in aim_kernels.cu), so the next norm kernel (the final norms
        # after the last layer) only norms it.
        fold = self.folds(rows)
        # Where norm_folds, in_proj of every layer after the first norms its own x from that sum (gemv_norm_params)
        # (from what each out_proj hands on: the residual times gm into buf.normed, its squares' tile sums)
        normed_in = self.norm_folds(rows)
        nexts = norms[1:] + [final]  # the norm after each layer
        ops, n_layer = [], len(self._params)
        for i, w in enumerate(self._params):
            if normed_in and i > 0:
                ops.append(("in_proj", self._normed_in_proj(buf, i, w["in_proj"])))
            else:
                p = _summed(norms[i]) if fold and i > 0 else norms[i]
                ops.append(("residual_norm", lambda p=p: k.residual_norm(p, stream())))
                ops.append(("in_proj", self._matmul(buf.normed, w["in_proj"], buf.zxbcdt)))
            ops.append(("selective_state_update",
                        lambda p=ssus[i]: k.selective_state_update(p, stream(), finish=not fold_norm)))
            if fold:
                to_next = self._to_next(buf, i + 1) if normed_in and i + 1 < n_layer else None
                ops.append(("out_proj", self._folded(buf.y, w["out_proj"], buf.out, nexts[i], to_next)))
            else:
                ops.append(("out_proj", self._matmul(buf.y, w["out_proj"], buf.out)))
        final = _summed(final) if fold else final
        ops.append(("final_norm", lambda: k.residual_norm(final, stream())))
        ops.append(("lm_head", self._matmul(buf.normed, self.model.lm_head.weight, buf.logits)))
        ops.append(("sample", lambda: self._sample(buf, settings, stream())))
        return ops

    def folds(self, rows: int) -> bool:
        """Whether a step of `rows` rows folds the residual add into out_proj (one group, our products, and an
        out_proj with a folded instance: Kernels.fold_supported)."""
        cfg = self.config
        return cfg.ngroups == 1 and self.use_gemv and self.kernels.fold_supported(rows, cfg.d_inner, cfg.d_model)

    def norm_folds(self, rows: int) -> bool:
        """Whether a step of `rows` rows folds the residual norm between layers into in_proj (after out_proj
        folded the residual add: Kernels.norm_fold_supported)."""
        return self.folds(rows) and self.kernels.norm_fold_supported(rows, self.config.d_model)

    def _to_next(self, buf: _Buffers, i: int):
        """What the out_proj before layer i hands to layer i's in_proj (the caller checked norm_folds)."""
        from aim_rt.plugins.kernels import gemv_next

        return gemv_next(buf.normed, self._norm_inputs(buf)[i], buf.sq_part)

    def _normed_in_proj(self, buf: _Buffers, i: int, w: Tensor) -> Callable[[], None]:
        """Layer i's in_proj of its norm of the summed residual (the caller checked norm_folds): aim_gemm_norm on
        aim_gemm's rows, else aim_gemv_norm."""
        from aim_rt.plugins.kernels import gemm_norm_params, gemv_norm_params

        self._norm_inputs(buf)
        eps, k = self.config.norm_eps, self.kernels
        if (splits := self._in_proj_splits(buf.normed.shape[0])) is not None:
            p = gemm_norm_params(buf.normed, buf.sq_part, buf.bias[i], w, buf.zxbcdt, splits, eps)
            return lambda: k.gemm_norm(p, torch.cuda.current_stream().cuda_stream)
        p = gemv_norm_params(buf.normed, buf.sq_part, buf.bias[i], w, buf.zxbcdt, eps)
        return lambda: k.gemv_norm(p, torch.cuda.current_stream().cuda_stream)

    def _in_proj_splits(self, rows: int) -> int | None:
        """aim_gemm's k split for in_proj at this many rows (as _matmul splits it); None where it is not aim_gemm's."""
        return self._gemm_splits(rows, self.config.d_in_proj, self.config.d_model)

    def _gemm_splits(self, rows: int, n: int, k: int) -> int | None:
        """aim_gemm's k split for a product of `rows` rows, n columns and depth k; None where it is not aim_gemm's."""
        from aim_rt.plugins.kernels import gemm_splits

        if not self.kernels.gemm_supported(rows, k):
            return None
        return gemm_splits(n, k, self.kernels.gemm_ctas)

    def _norm_inputs(self, buf: _Buffers, update: bool = False) -> Tensor:
        """What in_proj norming its own x takes from a sample's modulations (buf.mods): gm, the norm weight times
        (1 + scale) in float32 (returned), and each layer's in_proj weight times its shift (buf.bias, by the
        normed product's bias mode). Made on first use (their addresses then stay, for the graphs), remade with
        `update`."""
        from aim_rt.plugins.kernels import gemm_norm_bias_params, gemv_norm_bias_params

        if buf.gm is None:
            L, rows, _, d = buf.mods.shape
            buf.gm = torch.empty(L, rows, d, device=buf.mods.device)
            buf.sq_part = torch.zeros(rows, d // 8, device=buf.mods.device)
            buf.bias = torch.zeros(L, rows, self.config.d_in_proj, device=buf.mods.device)
            update = True
        if update:
            torch.mul(self._norm_w[:, None, :], 1.0 + buf.mods[:, :, 1].float(), out=buf.gm)
            stream = torch.cuda.current_stream().cuda_stream
            # W shift by the kernel that runs in_proj (its sums' order)
            splits = self._in_proj_splits(buf.mods.shape[1])
            for i in range(1, len(self._params)):  # (the first layer's in_proj takes the norm kernel's rows)
                shift, w = buf.mods[i][:, 0], self._params[i]["in_proj"]
                if splits is not None:
                    self.kernels.gemm_norm(gemm_norm_bias_params(shift, w, buf.bias[i], splits), stream)
                else:
                    self.kernels.gemv_norm(gemv_norm_bias_params(shift, w, buf.bias[i]), stream)
        return buf.gm

    def _set_mods(self, buf: _Buffers, mods) -> None:
        """A sample's adaLN modulations into the buffers (and what norm_folds derives from them)."""
        buf.mods.copy_(mods.layers)
        buf.final_mods.copy_(mods.final)
        if self.norm_folds(buf.hidden.shape[0]):
            self._norm_inputs(buf, update=True)

    def _folded(self, x: Tensor, w: Tensor, y: Tensor, norm, to_next=None) -> Callable[[], None]:
        """out_proj with the residual add of `norm` (the next layer's) folded in; the caller checked
        Kernels.fold_supported. `to_next`: what the next in_proj takes (gemv_next)."""
        from aim_rt.plugins.kernels import gemm_fold_params, gemm_splits, gemv_fold_params

        stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
        if self.kernels.gemm_supported(x.shape[0], x.shape[1], folded=True):
            p = gemm_fold_params(x, w, y, gemm_splits(w.shape[0], x.shape[1], self.kernels.gemm_fold_ctas),
                                  norm, to_next)
            return lambda: self.kernels.gemm_fold(p, stream())
        p = gemv_fold_params(x, w, y, norm, to_next)
        return lambda: self.kernels.gemv_fold(p, stream())

    def _matmul(self, x: Tensor, w: Tensor, y: Tensor) -> Callable[[], None]:
        """y = x @ w.T: our skinny tensor-core product (weights read once, streamed before the previous kernel
        ends) for 16-bit models up to GEMV_FAST_ROWS rows; above it, on Hopper, our split-k cluster GEMM up to
        128 rows (aim_gemm); cuBLAS otherwise."""
        from aim_rt.plugins.kernels import GEMV_FAST_ROWS, gemm_params, gemv_params

        stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
        splits = self._gemm_splits(x.shape[0], w.shape[0], x.shape[1]) if self.use_gemv else None
        if splits is not None:
            p = gemm_params(x, w, y, splits)
            return lambda: self.kernels.gemm(p, stream())
        if self.use_gemv and x.shape[0] <= GEMV_FAST_ROWS and self.kernels.gemv_supported(x.shape[0], x.shape[1]):
            p = gemv_params(x, w, y)
            return lambda: self.kernels.gemv(p, stream())
        return lambda: torch.mm(x, w.t(), out=y)

    def _step(self, buf: _Buffers, settings: SamplingSettings) -> None:
        for _, launch in self._ops(buf, settings):
            launch()

    @torch.no_grad()
    def op_timings(self, batch: int, settings: SamplingSettings, reps: int = 20, min_launches: int = 200) -> dict:
        """Per kind of op in a step: launches per step and device time per launch (µs), each kind timed alone
        as a CUDA graph of at least `reps` passes over all its launches (every layer's weights: no L2-resident
        replay) and at least `min_launches` launches (so that a graph launch's fixed cost, ~5 µs, adds little to
        a kind launched once per step, such as the sampler), and the kernels one step launches (= nodes of the
        step graph), counted by the profiler."""
        from torch.profiler import ProfilerActivity, profile

        from .bench import replay_us

        buf = self._alloc(batch)
        self._mode = (False, False)
        classes = torch.arange(batch) % self.config.num_classes
        buf.seeds.copy_(torch.arange(batch))
        self._prefill(buf, classes, None, settings)
        ops = self._ops(buf, settings)
        result = {}
        for kind in dict.fromkeys(kind for kind, _ in ops):
            launches = [fn for k, fn in ops if k == kind]
            graph = torch.cuda.CUDAGraph()
            for fn in launches:  # warm-up outside the capture (cuBLAS picks its kernels)
                fn()
            passes = timing_passes(kind, len(launches), reps, min_launches, self.config.num_tokens)
            with torch.cuda.graph(graph):
                for _ in range(passes):
                    for fn in launches:
                        fn()
            us = replay_us(graph, passes * len(launches), before=buf.step.zero_)
            result[kind] = {"launches_per_step": len(launches), "us_per_launch": us}
        def kernels_run(fn) -> int:  # kernels `fn` launches, counted by the profiler
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())

        buf.step.zero_()
        per_step = kernels_run(lambda: self._step(buf, settings))
        # the op kind of each kernel a step launches (every launch of a kind launches as many kernels as its
        # first); used only where they add up to the step's count
        per_launch = {kind: kernels_run(next(fn for k, fn in ops if k == kind)) for kind in result}
        kinds = [kind for kind, _ in ops for _ in range(per_launch[kind])]
        buf.step.zero_()
        timeline = self._replay_timeline(buf, settings, kinds if len(kinds) == per_step else None)
        return {"ops": result, "kernels_per_step": per_step, "timeline": timeline}

    @torch.no_grad()
    def phase_times(self, batch: int, settings: SamplingSettings) -> dict:
        """Wall time of a sample's phases (after a warm sample of this batch size): the prefill (the reference
        model's chunked path) and the host loop of graph replays, per step."""
        import time

        buf = self._alloc(batch)
        self._mode = (False, False)
        buf.seeds.copy_(torch.arange(batch))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        self._prefill(buf, torch.arange(batch) % self.config.num_classes, None, settings)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        self._run_steps(buf, settings, self.config.num_tokens - 1)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        return {"prefill_ms": (t1 - t0) * 1e3, "replays_us_per_step": (t2 - t1) / (self.config.num_tokens - 1) * 1e6}

    def _replay_timeline(self, buf: _Buffers, settings: SamplingSettings, kinds: list[str] | None = None) -> dict:
        """The captured step graph replayed under the profiler: kernel time and idle time between kernels per
        step, as the GPU ran them (where the 'gaps' of the op table go), and with `kinds` (the op kind of each
        kernel of a step) what each kind adds to the replayed step (bench.in_step_costs), µs per launch. The
        replay is of the longest captured graph (steps_per_graph steps up to MULTI_STEP_MAX_ROWS rows), as
        sampling replays it."""
        from torch.profiler import ProfilerActivity, profile

        from .bench import in_step_costs

        key = (buf.seeds.shape[0], *self._mode, *settings.to_dict().values())
        if key not in self._graphs:
            return {}
        steps = max(3, self._graphs[key][-1][0])
        buf.step.zero_()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            self._run_steps(buf, settings, steps)
            torch.cuda.synchronize()
        spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA)
        if len(spans) < 2:
            return {}
        busy = sum(end - start for start, end, _ in spans)
        idle = sum(max(0, spans[i + 1][0] - spans[i][1]) for i in range(len(spans) - 1))
        longest = sorted(((spans[i + 1][0] - spans[i][1], spans[i][2], spans[i + 1][2])
                          for i in range(len(spans) - 1)), reverse=True)[:5]
        in_step = in_step_costs([(a, b) for a, b, _ in spans], kinds) if kinds else None
        return {"kernels": len(spans) / steps, "kernel_us_per_step": busy / steps, "idle_us_per_step": idle / steps,
                "span_us_per_step": (spans[-1][1] - spans[0][0]) / steps,
                "longest_idle_us": [{"us": g, "after": a, "before": b} for g, a, b in longest],
                "in_step_us_per_launch": in_step}

    # ----- the sampler ------------------------------------------------------------------------------
    def _prefill(self, buf: _Buffers, classes: Tensor, prefix: Tensor | None,
                 settings: SamplingSettings) -> tuple[int, bool]:
        """Fill the buffers for drawing token `start`; returns (start, logits_ready).

        Without a prefix the class token alone is one step from the zero state: the buffers get its input (the
        class embedding, no position) and the step graph itself computes its logits (logits_ready False), so no
        eager prefill runs (it cost ~50 ms per sample). With a prefix, the reference's chunked prefill."""
        dev = self.model.device
        if prefix is None:
            cond = self.model.class_embedding(cfg_rows(classes.to(dev), self.config.null_class))
            mods = self.model.modulations(cond)
            buf.hidden.copy_(cond)
            buf.conv.zero_()
            buf.ssm.zero_()
            self._set_mods(buf, mods)
            buf.step.fill_(0)
            return 0, False
        start = prefix.shape[1]
        buf.tokens[:, :start] = prefix.to(dev)
        logits, state, mods = self.model.prefill(classes.to(dev), prefix.to(dev), settings.position_offset)
        buf.logits.copy_(logits)
        buf.conv.copy_(state.conv)
        buf.ssm.copy_(state.ssm)
        self._set_mods(buf, mods)
        buf.step.fill_(start)
        return start, True

    def _run_steps(self, buf: _Buffers, settings: SamplingSettings, count: int) -> None:
        if not self.use_graphs:
            for _ in range(count):
                self._step(buf, settings)
            return
        key = (buf.seeds.shape[0], *self._mode, *settings.to_dict().values())
        if key not in self._graphs:
            # Warm up on a side stream (cuBLAS picks its kernels), then capture one whole step, and
            # steps_per_graph steps (up to MULTI_STEP_MAX_ROWS rows). The warm-up changes the buffers; callers
            # run the prefill after this. The token index may still be num_tokens from the last sample of this
            # batch size: the warm-up step would read the teacher row and the position table past their ends
            # (an index in range is kept).
            buf.step.remainder_(self.config.num_tokens)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step(buf, settings)
            torch.cuda.current_stream().wait_stream(side)
            graphs = []
            multi = self.steps_per_graph if 2 * buf.seeds.shape[0] <= MULTI_STEP_MAX_ROWS else 1
            for steps in dict.fromkeys((1, multi)):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(steps):
                        self._step(buf, settings)
                graphs.append((steps, graph))
            self._graphs[key] = graphs
        single = self._graphs[key][0][1]
        steps, long_graph = self._graphs[key][-1]
        for _ in range(count // steps):
            long_graph.replay()
        for _ in range(count % steps):
            single.replay()

    @torch.no_grad()
    def sample(self, classes, seeds, settings: SamplingSettings, prefix=None, teacher=None, return_mixed=False):
        """Tokens (B, num_tokens) on the CPU. For parity checks: with `teacher` (B, num_tokens) those tokens are
        fed on while the returned tokens are still the draws; `return_mixed` also returns every step's CFG-mixed
        logits (B, num_tokens, V)."""
        cfg = self.config
        classes, seeds, prefix, _ = check_request(cfg, classes, seeds, prefix)
        batch = classes.shape[0]
        buf = self._alloc(batch)
        dev = self.model.device
        self._mode = (teacher is not None, return_mixed)
        if teacher is not None:  # persistent buffers: their addresses are baked into captured graphs
            if buf.teacher is None:
                buf.teacher = torch.zeros(batch, cfg.num_tokens, device=dev, dtype=torch.long)
            buf.teacher.copy_(torch.as_tensor(teacher).long())
        if return_mixed and buf.mixed is None:
            buf.mixed = torch.zeros(batch, cfg.vocab_size, device=dev)
        buf.seeds.copy_(seeds)
        if self.use_graphs and (batch, *self._mode, *settings.to_dict().values()) not in self._graphs:
            self._run_steps(buf, settings, 0)  # capture before the prefill fills the buffers
        start, logits_ready = self._prefill(buf, classes, prefix, settings)
        mixed = []
        remaining = cfg.num_tokens - start  # graph steps, each ending in the draw of one token
        if logits_ready:
            self._sample(buf, settings, torch.cuda.current_stream().cuda_stream)  # token `start`, prefill logits
            if return_mixed:
                mixed.append(buf.mixed.clone())
            remaining -= 1
        if return_mixed:  # one step at a time to read every step's logits
            for _ in range(remaining):
                self._run_steps(buf, settings, 1)
                mixed.append(buf.mixed.clone())
        else:
            self._run_steps(buf, settings, remaining)
        tokens = buf.tokens.cpu()
        if return_mixed:
            return tokens, torch.stack(mixed, dim=1)
        return tokens

    # ----- the VQ decoder ------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Images (B, 3, H, W) float32. 16-bit models: the NHWC decoder of aim_rt/vq_fast.py (fused GroupNorm
        kernels, a CUDA graph per batch size); float32 models: the reference decoder."""
        from .vq_fast import FastVQDecoder

        vq: VQModel | None = self.model.vq
        if vq is None:
            raise AiMError("this checkpoint has no VQ tokenizer to decode with")
        tokens = torch.as_tensor(tokens)
        # checked where they are (tokens from sample() are on the CPU: no device kernels and sync for the check)
        if (tokens.dim() != 2 or tokens.shape[1] != self.config.num_tokens
                or ((tokens < 0) | (tokens >= vq.config.n_embed)).any()):
            raise AiMError(f"tokens must be (B, {self.config.num_tokens}) in [0, {vq.config.n_embed})")
        tokens = tokens.to(self.model.device, torch.long)
        if self.dtype == torch.float32:
            return vq.decode_tokens(tokens).float()
        if self._vq is None:
            self._vq = FastVQDecoder(vq, self.dtype, use_graphs=self.use_graphs)
        return self._vq(tokens)
