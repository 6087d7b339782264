"""Fast VQ-f16 decoder: NHWC 16-bit activations, cuDNN convolutions, fused GroupNorm(+SiLU) kernels, a CUDA
graph per batch size.

    dec = FastVQDecoder(vq, torch.bfloat16)      # vq: aim_rt.vq.VQModel on a CUDA device (any dtype)
    images = dec(tokens)                          # tokens (B, h*w) long on that device -> (B, 3, H, W) float32

What it does differently from `VQModel.decode_tokens` (same maths, float32 statistics):
- the l2-normalised codebook lookup and post_quant_conv are folded (in float32) into one (n_embed, z_channels)
  table: the quantizer is a single gather;
- activations stay (B, H, W, C) contiguous; convolutions are torch/cuDNN on channels_last views, without bias;
- each conv bias, residual add and GroupNorm statistics happen in one pass over the conv output
  (plugins/vq_kernels.cu `vq_gn_stats`, whose last block per image also turns the statistics into per-channel
  scale and shift), and normalize * gamma + beta + SiLU in one more (`vq_gn_apply`);
- each nearest 2x upsample + 3x3 conv is a 2x2 conv with 4x the outputs at low resolution; the phase interleave
  happens in the following statistics pass;
- the attention's q, k, v are one GEMM and the attention is F.scaled_dot_product_attention;
- norm_out + SiLU + the final 3-channel conv + bias are one kernel (`vq_conv_out`, tensor cores) writing the
  float32 NCHW images;
- one CUDA graph per batch size, captured on first use.

The kernels are NVRTC-compiled once per (source, options, NVRTC version, arch) and cached on disk (the same
cache folder as plugins/kernels.py). cuDNN chooses its convolution algorithms by its heuristics: timing them
(`benchmark=True`, cudnn.benchmark during the warm-up) cost a new process 2.2 s on its first decode for the same
choices on the H200 (identical images and times at batch 1 / 16 / 64, bench/results/decode_first_call_*). Without
CUDA (or for float32) the same decoder runs on
pure torch ops (`_TorchOps`), which is what the CPU tests check against the reference.
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .plugins.kernels import VQ_DEFINES, kernel_arch
from .vq import VQModel

VEC_BATCH = VQ_DEFINES["VEC_BATCH"]  # the default build's vectors per thread before computing (VEC_BATCH)


def _source() -> Path:
    from .plugins import kernels  # plugins/ is a subpackage of aim_rt (checkout and wheel alike)

    return kernels.VQ_SOURCE


ELEM_KINDS = {"float16": 1, "bfloat16": 2}
GROUPS = 32
EPS = 1e-6
STATS_THREADS = 256
CHUNK_BYTES = 32 << 10  # vq_gn_stats: about this much of x per block (16-bit elements) ...
MAX_CHUNKS = 256        # ... and at most this many blocks per image (the last block merges their partials)


def stats_chunking(hw: int, c: int, chunk_bytes: int = CHUNK_BYTES, max_chunks: int = MAX_CHUNKS) -> tuple[int, int]:
    """(rows_per_chunk, nchunk) of vq_gn_stats for an image of `hw` rows of `c` 16-bit channels: about
    `chunk_bytes` of x per block, at most `max_chunks` blocks, rows a multiple of the rows a block has in flight.
    A function of the image's shape alone -- not of the batch size or the GPU -- so the chunk partials and the
    order the last block merges them in are the same for an image decoded alone or in a batch: its statistics are
    the same bits (the whole decode is not: cuDNN picks its conv kernels per batch size, and they round
    differently -- bench/results/README.md, v4)."""
    tpr = STATS_THREADS // (c // 8)
    rows = max(tpr, chunk_bytes // (2 * c))
    nchunk = max(1, min(-(-hw // rows), max_chunks))
    rpc = -(-hw // nchunk)
    rpc = -(-rpc // tpr) * tpr
    return rpc, -(-hw // rpc)


# ----- NVRTC: the same build and on-disk cache as the decode-step kernels (plugins/kernels.py) ---------------
def compile_vq_cubin(dtype: str, arch: str, use_cache: bool = True, source: Path | None = None,
                     vec_batch: int = VEC_BATCH) -> bytes:
    """NVRTC-compile vq_kernels.cu for one element type ('bfloat16'/'float16') and arch ('sm_90'), cached on disk
    by (source, options, NVRTC version). `vec_batch`: vectors each thread loads before it computes (VEC_BATCH)."""
    from .plugins.kernels import compile_cubin

    _check_dtype(dtype)
    return compile_cubin(dtype, arch, use_cache, defines={"VEC_BATCH": int(vec_batch)},
                         source_path=_source() if source is None else Path(source))


def compile_vq_async(dtype: str, arch: str, vec_batch: int | None = None):
    """compile_vq_cubin (with the disk cache) in a background thread, once per process: a Future of the cubin
    (see plugins/kernels.py compile_async). vec_batch None: the default build, the one the CLI starts before
    torch loads (kernels.precompile_early)."""
    from .plugins.kernels import compile_async

    _check_dtype(dtype)
    return compile_async(dtype, arch, VQ_DEFINES if vec_batch is None else {"VEC_BATCH": int(vec_batch)}, _source())


def _check_dtype(dtype: str) -> None:
    from .plugins.kernels import KernelError

    if dtype not in ELEM_KINDS:
        raise KernelError(f"VQ kernels support {sorted(ELEM_KINDS)}, not {dtype!r}")


P, LL, I, Fl = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_float


class GnStatsParams(ctypes.Structure):
    _fields_ = [("x", P), ("res", P), ("bias", P), ("out", P), ("partial", P), ("counter", P), ("gamma", P),
                ("beta", P), ("fold", P), ("scale", P), ("shift", P), ("hw", LL), ("c", I), ("groups", I),
                ("rows_per_chunk", I), ("nchunk", I), ("sub_h", I), ("sub_w", I), ("eps", Fl)]


class GnApplyParams(ctypes.Structure):
    _fields_ = [("x", P), ("scale", P), ("shift", P), ("out", P), ("per_image", LL), ("c", I), ("silu", I)]


class UpsampleParams(ctypes.Structure):
    _fields_ = [("x", P), ("out", P), ("total_vec", LL), ("h", I), ("w", I), ("c", I)]


class ConvOutParams(ctypes.Structure):
    _fields_ = [("x", P), ("scale", P), ("shift", P), ("wt", P), ("bias", P), ("out", P), ("h", I), ("w", I),
                ("c", I), ("out_ch", I), ("tiles_x", I), ("tiles_y", I), ("ntiles", I)]


# tap folding for a 3x3 conv after a nearest 2x upsample: output phase d uses input offsets (d - 1, d) -> rows
_PHASE_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def subpixel_weight(w: Tensor) -> Tensor:
    """(Cout, Cin, 3, 3) conv after nearest 2x upsampling -> (4 Cout, Cin, 2, 2) on the 1-padded input, phases
    (dy, dx) in the order 2 dy + dx; float32 sums."""
    m = torch.tensor(_PHASE_TAPS, dtype=torch.float32, device=w.device)  # (phase, 2, 3)
    return torch.cat([torch.einsum("ak,oikl,bl->oiab", m[dy], w.float(), m[dx]) for dy in (0, 1) for dx in (0, 1)])


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def kernels_support(channels: int) -> bool:
    """Shapes the NHWC kernels are written for (the GroupNorm needs channels % 32 == 0 anyway)."""
    return channels % 8 == 0 and channels % GROUPS == 0 and channels // 8 <= STATS_THREADS


CO_TH, CO_TW, CO_OUT, CO_PF = 4, 32, 8, 13  # vq_conv_out's output tile, outputs (mma n = 8), vectors/thread


def conv_out_smem(channels: int) -> int:
    """Shared memory of one vq_conv_out block: the padded input tile, the weights, scale and shift."""
    return ((CO_TH + 2) * (CO_TW + 2) * (channels + 8) + CO_OUT * (9 * channels + 8)) * 2 + 8 * channels


def conv_out_weight(w: Tensor, dtype: torch.dtype) -> Tensor:
    """(out_ch, C, 3, 3) -> (8, 9, C) [out channel][tap][in channel], zero rows past out_ch (vq_conv_out)."""
    o = w.detach().float().permute(0, 2, 3, 1).reshape(w.shape[0], 9, w.shape[1])
    return torch.cat([o, o.new_zeros(CO_OUT - o.shape[0], *o.shape[1:])]).to(dtype).contiguous()


# ----- the two op sets: pure torch (reference semantics, any device/dtype) and the CUDA kernels ----------
# stats(x, norm, res, bias, out) -> (scale, shift) of GroupNorm `norm` = (gamma, beta) over v = x + res + bias
# (v written to `out` when given; a bias not written is folded into the shift, since the apply pass's input lacks
# it); norm None: only the write. apply(x, scale, shift, silu) -> normalized. subpixel_stats(y, bias, norm) ->
# (the phase-interleaved upsample conv output + bias, its stats). conv_out(h, scale, shift, w, bias, oc) ->
# (B, oc, H, W) float32: the final SiLU(norm) + 3x3 conv.
class _TorchOps:
    """GroupNorm split as the kernels split it; activations (B, H, W, C)."""

    def stats(self, x: Tensor, norm, res: Tensor | None = None, bias: Tensor | None = None,
              out: Tensor | None = None):
        v = x.float()
        if res is not None:
            v = v + res.float()
        if bias is not None:
            v = v + bias
        if out is not None:
            r = v.to(x.dtype)
            out.copy_(r)
            v = r.float()
        if norm is None:
            return None
        g = v.reshape(v.shape[0], -1, GROUPS, v.shape[-1] // GROUPS)
        mean, var = g.mean(dim=(1, 3)), g.var(dim=(1, 3), unbiased=False)
        gamma, beta = norm
        cg = gamma.numel() // GROUPS
        a = (var + EPS).rsqrt().repeat_interleave(cg, dim=1) * gamma
        s = beta - mean.repeat_interleave(cg, dim=1) * a
        if bias is not None and out is None:
            s = s + bias * a
        return a, s

    def apply(self, x: Tensor, a: Tensor, s: Tensor, silu: bool) -> Tensor:
        y = x.float() * a[:, None, None, :] + s[:, None, None, :]
        return (F.silu(y) if silu else y).to(x.dtype)

    def upsample(self, x: Tensor) -> Tensor:
        return x.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)

    def subpixel_gather(self, y: Tensor, bias: Tensor | None) -> Tensor:
        b, h1, w1, c4 = y.shape
        h, w, c = h1 - 1, w1 - 1, c4 // 4
        y = y.reshape(b, h1, w1, 2, 2, c)
        rows = [torch.stack([y[:, dy:dy + h, dx:dx + w, dy, dx] for dx in (0, 1)], dim=3) for dy in (0, 1)]
        out = torch.stack(rows, dim=2).reshape(b, 2 * h, 2 * w, c).float()  # (b, h, dy, w, dx, c)
        return (out if bias is None else out + bias).to(y.dtype)

    def subpixel_stats(self, y: Tensor, bias: Tensor | None, norm):
        h = self.subpixel_gather(y, bias)
        return h, self.stats(h, norm)

    def conv_out(self, h: Tensor, a: Tensor, s: Tensor, w: Tensor, bias: Tensor, out_ch: int) -> Tensor:
        t = self.apply(h, a, s, True).permute(0, 3, 1, 2).float()  # accumulate in float32, as the MMAs do
        return F.conv2d(t, w.float(), padding=1)[:, :out_ch] + bias[:, None, None]


class _CudaOps:
    """The same operations on plugins/vq_kernels.cu (16-bit activations, NHWC, C % 8 == 0)."""

    def __init__(self, dtype: torch.dtype, device: torch.device, vec_batch: int = VEC_BATCH,
                 chunk_bytes: int = CHUNK_BYTES, max_chunks: int = MAX_CHUNKS):
        from cuda.bindings import driver

        from .plugins.kernels import _check

        self.driver, self._check = driver, _check
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        self.mma = major >= 8  # vq_conv_out's mma.sync m16n8k16
        name = str(dtype).removeprefix("torch.")
        torch.empty(1, device=device)  # the primary context current for the driver API
        cubin = compile_vq_async(name, kernel_arch(major, minor), vec_batch=vec_batch).result()
        self.vec_batch = vec_batch
        if chunk_bytes < 1 or max_chunks < 1:
            raise ValueError(f"chunk_bytes and max_chunks must be positive, not {chunk_bytes}, {max_chunks}")
        self.chunk_bytes, self.max_chunks = chunk_bytes, max_chunks
        self.module = _check(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
        self.fn = {n: _check(driver.cuModuleGetFunction(self.module, n.encode()), f"cuModuleGetFunction({n})")
                   for n in ("vq_gn_stats", "vq_gn_apply", "vq_upsample2x", "vq_conv_out")}
        props = torch.cuda.get_device_properties(index)
        self.sms = props.multi_processor_count
        attr = driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        dev = _check(driver.cuDeviceGet(index), "cuDeviceGet")
        self.smem_optin = int(_check(driver.cuDeviceGetAttribute(attr, dev), "cuDeviceGetAttribute"))
        self._occ: dict[tuple, int] = {}
        self._counters: dict[int, Tensor] = {}  # per batch size, for launches outside a counter scope
        self._scopes: dict[object, list[Tensor]] = {}  # scope key -> one counter buffer per stats call, in order
        self._scope: list[Tensor] | None = None
        self._scope_pos = 0
        self._conv_out_smem = 0

    def _launch(self, name: str, grid: tuple, block: int, smem: int, params) -> None:
        stream = torch.cuda.current_stream().cuda_stream
        holder = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        self._check(self.driver.cuLaunchKernel(self.fn[name], *grid, block, 1, 1, smem, self.driver.CUstream(stream),
                                               ctypes.addressof(holder), 0), name)

    def _blocks_per_sm(self, name: str, block: int, smem: int) -> int:
        key = (name, block, smem)
        if key not in self._occ:
            n = self._check(self.driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(self.fn[name], block, smem),
                            "cuOccupancyMaxActiveBlocksPerMultiprocessor")
            self._occ[key] = max(1, int(n))
        return self._occ[key]

    @contextlib.contextmanager
    def counter_scope(self, key):
        """Inside, the n-th statistics launch uses the n-th counter buffer of scope `key` (made, zeroed, on first
        use; the kernel leaves it zero). The decoder opens one scope per CUDA graph and one per (stream, batch
        size) for eager calls, so graphs and decodes on different streams never share arrival counters; a
        graph's buffers are all made by the eager warm-up run before its capture."""
        prev = self._scope, self._scope_pos
        self._scope, self._scope_pos = self._scopes.setdefault(key, []), 0
        try:
            yield
        finally:
            self._scope, self._scope_pos = prev

    def _counter(self, b: int, device) -> Tensor:
        if self._scope is None:
            if b not in self._counters:
                self._counters[b] = torch.zeros(b, device=device, dtype=torch.int32)
            return self._counters[b]
        if self._scope_pos == len(self._scope) or self._scope[self._scope_pos].numel() != b:
            self._scope[self._scope_pos:self._scope_pos + 1] = [torch.zeros(b, device=device, dtype=torch.int32)]
        self._scope_pos += 1
        return self._scope[self._scope_pos - 1]

    def _stats(self, x: Tensor, norm, b: int, hw: int, c: int, res=None, bias=None, out=None, sub=(0, 0)):
        cv = c // 8
        block = cv * (STATS_THREADS // cv)
        smem = (2 * block * 8 + c) * 4
        rpc, nchunk = stats_chunking(hw, c, self.chunk_bytes, self.max_chunks)  # never from b or the GPU
        scale = shift = partial = counter = gamma = beta = fold = None
        if norm is not None:
            gamma, beta = norm
            partial = torch.empty(b, nchunk, GROUPS, 2, device=x.device, dtype=torch.float32)
            scale = torch.empty(b, c, device=x.device, dtype=torch.float32)
            shift = torch.empty_like(scale)
            counter = self._counter(b, x.device)
            fold = bias if out is None else None
        p = GnStatsParams(_ptr(x), _ptr(res), _ptr(bias), _ptr(out), _ptr(partial), _ptr(counter), _ptr(gamma),
                          _ptr(beta), _ptr(fold), _ptr(scale), _ptr(shift), hw, c, GROUPS, rpc, nchunk, sub[0],
                          sub[1], EPS)
        self._launch("vq_gn_stats", (nchunk, b, 1), block, smem, p)
        return None if norm is None else (scale, shift)

    def stats(self, x: Tensor, norm, res: Tensor | None = None, bias: Tensor | None = None,
              out: Tensor | None = None):
        if norm is None and out is None:
            return None
        b, c = x.shape[0], x.shape[-1]
        return self._stats(x, norm, b, x.numel() // (b * c), c, res, bias, out)

    def subpixel_stats(self, y: Tensor, bias: Tensor | None, norm):
        b, h1, w1, c4 = y.shape
        h, w, c = h1 - 1, w1 - 1, c4 // 4
        out = torch.empty(b, 2 * h, 2 * w, c, device=y.device, dtype=y.dtype)
        return out, self._stats(y, norm, b, 4 * h * w, c, bias=bias, out=out, sub=(h, w))

    def apply(self, x: Tensor, a: Tensor, s: Tensor, silu: bool) -> Tensor:
        out = torch.empty_like(x)
        b, c = x.shape[0], x.shape[-1]
        cv = c // 8
        block = cv * (STATS_THREADS // cv)
        per_image = x.numel() // (8 * b)
        p = GnApplyParams(_ptr(x), _ptr(a), _ptr(s), _ptr(out), per_image, c, int(silu))
        self._launch("vq_gn_apply", (-(-per_image // (block * self.vec_batch)), b, 1), block, 0, p)
        return out

    def upsample(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        out = torch.empty(b, 2 * h, 2 * w, c, device=x.device, dtype=x.dtype)
        total = x.numel() // 8
        p = UpsampleParams(_ptr(x), _ptr(out), total, h, w, c)
        self._launch("vq_upsample2x", (max(1, min(-(-total // 256), self.sms * 16)), 1, 1), 256, 0, p)
        return out

    def conv_out_supported(self, channels: int, out_ch: int) -> bool:
        cv = channels // 8
        return (self.mma and channels % 16 == 0 and out_ch <= CO_OUT and 256 % cv == 0
                and (CO_TH + 2) * (CO_TW + 2) * cv <= 256 * CO_PF and conv_out_smem(channels) <= self.smem_optin)

    def conv_out(self, h: Tensor, a: Tensor, s: Tensor, w: Tensor, bias: Tensor, out_ch: int) -> Tensor:
        b, hh, ww, c = h.shape
        smem = conv_out_smem(c)
        if smem > self._conv_out_smem:  # above 48 KiB needs the opt-in
            attr = self.driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            self._check(self.driver.cuFuncSetAttribute(self.fn["vq_conv_out"], attr, smem), "cuFuncSetAttribute")
            self._conv_out_smem = smem
        out = torch.empty(b, out_ch, hh, ww, device=h.device, dtype=torch.float32)
        tx, ty = -(-ww // CO_TW), -(-hh // CO_TH)
        ntiles = tx * ty * b
        grid = min(ntiles, self._blocks_per_sm("vq_conv_out", 256, smem) * self.sms)  # persistent blocks
        p = ConvOutParams(_ptr(h), _ptr(a), _ptr(s), _ptr(w), _ptr(bias), _ptr(out), hh, ww, c, out_ch, tx, ty,
                          ntiles)
        self._launch("vq_conv_out", (grid, 1, 1), 256, smem, p)
        return out


# ----- the decoder ---------------------------------------------------------------------------------------
class _Res:
    pass


class FastVQDecoder:
    """tokens (B, h*w) long, on vq's CUDA device -> images (B, 3, 16h, 16w) float32, nominally in [-1, 1].

    `dtype`: activation/weight type (bfloat16 default; float16 also runs the kernels; float32 runs torch ops).
    `use_graphs`: capture one CUDA graph per batch size on first use (the tokens are copied into it).
    `kernels`: use plugins/vq_kernels.cu (default: on CUDA for 16-bit types); False = pure torch ops.
    `benchmark`: let cuDNN time its algorithms during the first call of each batch size (per process; seconds
    on a new process's first call) instead of choosing them by its heuristics.
    `subpixel`: fold each nearest 2x upsample into its conv (a 2x2 conv with 4x the outputs at low resolution,
    5/9 fewer FLOPs; the phase interleave happens in the next statistics pass) instead of upsampling then a 3x3
    conv.
    `fuse_out`: norm_out + SiLU + conv_out + bias in one kernel (vq_conv_out, tensor cores) where supported;
    False: an apply pass, cuDNN's conv (padded to `out_pad` outputs), then the bias in float32.
    `vec_batch`: kernel build option VEC_BATCH (vectors each thread loads before computing).
    `chunk_bytes`, `max_chunks`: how the statistics pass splits an image over blocks (`stats_chunking`: about
    chunk_bytes of each image per block, at most max_chunks blocks per image; from the image shape alone, so an
    image decoded alone or in a batch gets the same statistics, bit for bit).
    Tokens are not range-checked here (that would sync with the host): callers check them.
    """

    def __init__(self, vq: VQModel, dtype: torch.dtype = torch.bfloat16, use_graphs: bool | None = None,
                 kernels: bool | None = None, benchmark: bool = False, subpixel: bool = True, out_pad: int = 8,
                 fuse_out: bool = True, vec_batch: int = VEC_BATCH, chunk_bytes: int = CHUNK_BYTES,
                 max_chunks: int = MAX_CHUNKS):
        dev = vq.device
        cuda = dev.type == "cuda"
        self.config, self.device, self.dtype = vq.config, dev, dtype
        self.use_graphs = cuda if use_graphs is None else use_graphs
        self.benchmark, self.subpixel = benchmark, subpixel
        want = cuda and dtype in (torch.bfloat16, torch.float16) if kernels is None else kernels
        self.out_pad = out_pad
        self.ops = _CudaOps(dtype, dev, vec_batch, chunk_bytes, max_chunks) if want else _TorchOps()
        self._graphs: dict[int, tuple] = {}
        self._prepare(vq)
        self.fuse_out = fuse_out and isinstance(self.ops, _CudaOps) and \
            self.ops.conv_out_supported(self.conv_out[0].shape[1], self.out_channels)

    # weights, folded in float32 once
    def _prepare(self, vq: VQModel) -> None:
        dt, dec = self.dtype, vq.decoder
        f32 = lambda t: t.detach().float().contiguous()  # noqa: E731

        def convw(m, pad_out: int | None = None):
            w = m.weight.detach().float()
            if pad_out is not None and w.shape[0] < pad_out:
                w = torch.cat([w, w.new_zeros(pad_out - w.shape[0], *w.shape[1:])])
            return w.to(dt).contiguous(memory_format=torch.channels_last)

        with torch.no_grad():
            code = F.normalize(vq.quantize.embedding.weight.float(), p=2, dim=-1)
            pq = vq.post_quant_conv
            self.table = (code @ pq.weight.float().flatten(1).t() + pq.bias.float()).to(dt).contiguous()

            def res(m):
                r = _Res()
                r.norm1, r.norm2 = (f32(m.norm1.weight), f32(m.norm1.bias)), (f32(m.norm2.weight), f32(m.norm2.bias))
                r.w1, r.cb1, r.w2 = convw(m.conv1), f32(m.conv1.bias), convw(m.conv2)
                r.wn = convw(m.nin_shortcut) if hasattr(m, "nin_shortcut") else None
                r.bias_out = f32(m.conv2.bias) + (f32(m.nin_shortcut.bias) if r.wn is not None else 0)
                return r

            def attn(m):
                a = _Res()
                a.norm1 = (f32(m.norm.weight), f32(m.norm.bias))
                a.wqkv = torch.cat([f32(x.weight).flatten(1) for x in (m.q, m.k, m.v)]).to(dt).contiguous()
                a.bqkv = torch.cat([f32(x.bias) for x in (m.q, m.k, m.v)]).to(dt).contiguous()
                a.wo, a.bo = f32(m.proj_out.weight).flatten(1).to(dt).contiguous(), f32(m.proj_out.bias)
                return a

            self.conv_in = (convw(dec.conv_in), f32(dec.conv_in.bias))
            # the blocks in order: ("res", r), ("attn", a), ("up", (w, bias))
            self.seq = [("res", res(dec.mid[0])), ("attn", attn(dec.mid[1])), ("res", res(dec.mid[2]))]
            for level in dec.conv_blocks:
                for i, r in enumerate(level.res):
                    self.seq.append(("res", res(r)))
                    if len(level.attn):
                        self.seq.append(("attn", attn(level.attn[i])))
                if hasattr(level, "upsample"):
                    m = level.upsample.conv
                    w = subpixel_weight(m.weight.detach()).to(dt).contiguous(memory_format=torch.channels_last) \
                        if self.subpixel else convw(m)
                    self.seq.append(("up", (w, f32(m.bias))))
            self.norm_out = (f32(dec.norm_out.weight), f32(dec.norm_out.bias))
            self.out_channels = dec.conv_out.weight.shape[0]
            self.conv_out = (convw(dec.conv_out, pad_out=self.out_pad), f32(dec.conv_out.bias))
            self.conv_out_mma = conv_out_weight(dec.conv_out.weight, dt) if self.out_channels <= CO_OUT else None
        # the GroupNorm whose statistics each block's output feeds (an upsample conv reads its input raw)
        firsts = [m.norm1 if kind != "up" else None for kind, m in self.seq] + [self.norm_out]
        self.next_norm = firsts[1:]
        self.first_norm = firsts[0]
        channels = {self.conv_in[0].shape[0]} | {m.w1.shape[0] for kind, m in self.seq if kind == "res"}
        if isinstance(self.ops, _CudaOps) and not all(kernels_support(c) for c in channels):
            self.ops = _TorchOps()

    @staticmethod
    def _conv(x: Tensor, w: Tensor, pad: int) -> Tensor:
        y = F.conv2d(x.permute(0, 3, 1, 2), w, None, padding=pad).permute(0, 2, 3, 1)
        return y if y.is_contiguous() else y.contiguous()

    def _res(self, x: Tensor, st, r: _Res, nxt):
        ops = self.ops
        h = self._conv(ops.apply(x, *st, True), r.w1, 1)
        a, s = ops.stats(h, r.norm2, bias=r.cb1)  # the bias folded into the shift, not written
        h = self._conv(ops.apply(h, a, s, True), r.w2, 1)
        xs = self._conv(x, r.wn, 0) if r.wn is not None else x
        return h, ops.stats(h, nxt, res=xs, bias=r.bias_out, out=h)

    def _attn(self, x: Tensor, st, m: _Res, nxt):
        ops = self.ops
        b, hh, ww, c = x.shape
        t = ops.apply(x, *st, False).reshape(b, hh * ww, c)
        q, k, v = F.linear(t, m.wqkv, m.bqkv).unsqueeze(1).split(c, dim=-1)
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        o = F.linear(o, m.wo).reshape(b, hh, ww, c)
        return o, ops.stats(o, nxt, res=x, bias=m.bo, out=o)

    def forward(self, tokens: Tensor) -> Tensor:
        """The whole decode, eager (what the graphs capture)."""
        ops = self.ops
        b, n = tokens.shape
        side = int(round(n ** 0.5))
        z = F.embedding(tokens, self.table).reshape(b, side, side, -1)
        h = self._conv(z, self.conv_in[0], 1)
        st = ops.stats(h, self.first_norm, bias=self.conv_in[1], out=h)
        for (kind, m), nxt in zip(self.seq, self.next_norm):
            if kind == "res":
                h, st = self._res(h, st, m, nxt)
            elif kind == "attn":
                h, st = self._attn(h, st, m, nxt)
            elif self.subpixel:
                y = self._conv(h, m[0], 1)  # 2x2 kernel, padding 1: (h+1, w+1) outputs, 4 phases
                h, st = ops.subpixel_stats(y, m[1], nxt)
            else:
                h = self._conv(ops.upsample(h), m[0], 1)
                st = ops.stats(h, nxt, bias=m[1], out=h)
        a, s = st
        if self.fuse_out:
            return ops.conv_out(h, a, s, self.conv_out_mma, self.conv_out[1], self.out_channels)
        y = self._conv(ops.apply(h, a, s, True), self.conv_out[0], 1)
        y = y[..., : self.out_channels].float() + self.conv_out[1]
        return y.permute(0, 3, 1, 2).contiguous()

    @contextlib.contextmanager
    def _flags(self):
        old = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.benchmark
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = old

    def _counters(self, key):
        """The statistics kernels' arrival counters of one graph / one (stream, batch size) of eager calls."""
        return self.ops.counter_scope(key) if isinstance(self.ops, _CudaOps) else contextlib.nullcontext()

    @torch.no_grad()
    def __call__(self, tokens: Tensor) -> Tensor:
        tokens = torch.as_tensor(tokens, device=self.device).long()
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, h*w), got shape {tuple(tokens.shape)}")
        if not self.use_graphs:
            stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
            with self._flags(), self._counters(("eager", stream, tokens.shape[0])):
                return self.forward(tokens)
        batch = tokens.shape[0]
        entry = self._graphs.get(batch)
        if entry is None or entry[1].shape != tokens.shape:
            static_in = tokens.clone()
            with self._flags(), self._counters(("graph", tuple(tokens.shape))):
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    self.forward(static_in)  # cuDNN algorithm choice, lazy inits
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = self.forward(static_in)
            entry = self._graphs[batch] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        static_in.copy_(tokens)
        graph.replay()
        return static_out.clone()
