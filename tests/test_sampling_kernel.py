"""aim_cfg_sample against an exact fixed-point model of its rule, on many rows: ties, extreme values, small
vocabularies, top-k and top-p off and on, every element type, the teacher-forcing and next-input outputs.
GPU tests skip cleanly without CUDA.

`fixed_point_draw` is the sampler's rule written with torch (in integers where the kernel is): probabilities
floor(exp(x - max) * 2^40) of the mixed logits, top-k keeps every key >= the k-th largest, top-p keeps the tokens
whose ascending cumulative mass (ties as one) exceeds floor(z * (1 - top_p)), and the draw is the first token
whose cumulative mass in vocabulary order exceeds floor(total * u). The kernel must equal it token for token;
aim_rt.sampling.draw (float softmax) may differ only where float rounding moves a cut point.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aim_rt import ops
from aim_rt.sampling import SamplingSettings, draw, uniforms

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")

FLT_MAX = 3.4028234663852886e38


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """The kernel's monotone float32 -> uint32 map, as int64."""
    bits = x.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(bits >= 0x80000000, (~bits) & 0xFFFFFFFF, bits | 0x80000000)


def fixed_point_draw(mixed: torch.Tensor, seeds: torch.Tensor, step: int, top_k: int, top_p: float) -> torch.Tensor:
    """Token per row of float32 `mixed` (on the GPU: torch.exp there is the kernel's expf); vocab = none drawn."""
    rows, vocab = mixed.shape
    keys = order_keys(mixed)
    mx = mixed.max(dim=1, keepdim=True).values.clamp_min(-FLT_MAX)
    w = (torch.exp(mixed - mx).double() * 2.0 ** 40).long()
    if 0 < top_k < vocab:
        kth = keys.topk(top_k, dim=1).values[:, -1:]
        w = torch.where(keys >= kth, w, torch.zeros_like(w))
    if np.float32(top_p) < 1:
        z = w.sum(1, keepdim=True)
        limit = (z.double() * (1.0 - float(np.float32(top_p)))).long()
        sorted_keys, order = keys.sort(dim=1)
        cum = w.gather(1, order).cumsum(1)
        at_or_below = cum.gather(1, torch.searchsorted(sorted_keys, keys, right=True) - 1)
        w = torch.where(at_or_below > limit, w, torch.zeros_like(w))
    total = w.sum(1)
    target = (total.double() * uniforms(seeds.cpu(), step).double().to(mixed.device)).long()
    return (w.cumsum(1) <= target.unsqueeze(1)).sum(1)


def run_sampler(kernels, logits, seeds, step, settings, *, teacher=None, d=0, num_tokens=None, position_offset=1):
    """One launch on (2 * batch, vocab) logits; returns tokens[:, step], the mixed logits, and with d > 0 the
    next input (2 * batch, d) and next token (batch) with the embeddings used."""
    from aim_rt.plugins.kernels import SampleParams

    # tokens and teacher share the row stride num_tokens (SampleParams): a teacher sets it
    num_tokens = num_tokens or (teacher.shape[1] if teacher is not None else step + 1)
    batch, vocab = logits.shape[0] // 2, logits.shape[1]
    dev, dt = logits.device, logits.dtype
    tokens = torch.full((batch, num_tokens), -1, device=dev, dtype=torch.long)
    mixed = torch.full((batch, vocab), float("nan"), device=dev)
    step_t = torch.tensor([step], device=dev, dtype=torch.int32)
    emb = {}
    if d:
        g = torch.Generator(device=dev).manual_seed(7)
        emb = dict(word=torch.randn(vocab + 1, d, device=dev, generator=g).to(dt),
                   pos=torch.randn(num_tokens + position_offset, d, device=dev, generator=g).to(dt),
                   next_input=torch.full((2 * batch, d), 7.0, device=dev, dtype=dt),
                   next_token=torch.full((batch,), -1, device=dev, dtype=torch.long))
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    p = SampleParams(
        logits=logits.data_ptr(), logits_stride=logits.stride(0), batch=batch, vocab=vocab, uncond_rows=batch,
        cfg_scale=settings.cfg_scale, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
        seeds=seeds.data_ptr(), step=step_t.data_ptr(), position_offset=position_offset, tokens=tokens.data_ptr(),
        num_tokens=num_tokens, teacher=ptr(teacher), mixed_out=mixed.data_ptr(), word_emb=ptr(emb.get("word")),
        pos_emb=ptr(emb.get("pos")), d=d, next_input=ptr(emb.get("next_input")), next_token=ptr(emb.get("next_token")))
    kernels.cfg_sample(p, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return tokens[:, step], mixed, emb


def random_logits(kind: str, rows: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    """float32 (rows, vocab) on the GPU, before the cast to the kernel's element type."""
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    if kind == "normal":
        return 3 * r(rows, vocab)
    if kind == "mild":  # a flat softmax after CFG (as a random-weight AiM's): the top-p cut among many entries
        return 0.6 * r(rows, vocab)
    if kind == "gumbel":  # heavy upper tail, a few dominant tokens
        u = torch.rand(rows, vocab, device="cuda", generator=g).clamp(1e-12, 1 - 1e-7)
        return -4 * torch.log(-torch.log(u))
    if kind == "ties":  # few distinct values: large tie groups at every cut
        return torch.round(2 * r(rows, vocab))
    if kind == "flat":  # one value per row (every token tied)
        return r(rows, 1).expand(rows, vocab).contiguous()
    if kind == "extreme":  # magnitudes from 1e-30 to 1e30, exact zeros, and both signs
        mag = 10.0 ** torch.randint(-30, 31, (rows, vocab), device="cuda", generator=g).float()
        x = r(rows, vocab) * mag
        return torch.where(torch.rand(rows, vocab, device="cuda", generator=g) < 0.05, torch.zeros_like(x), x)
    if kind == "spike":  # one huge outlier above, one below, the rest normal
        x = r(rows, vocab)
        x[:, 0], x[:, -1] = 1e4, -1e4
        return x
    raise ValueError(kind)


SETTINGS = [
    SamplingSettings(),  # official: cfg 5, top-k 600, top-p 0.98
    SamplingSettings(top_k=0, top_p=0.9, temperature=0.7),
    SamplingSettings(top_k=50, top_p=1.0, cfg_scale=1.5),
    SamplingSettings(top_k=0, top_p=1.0, cfg_scale=0.0),
    SamplingSettings(top_k=1, top_p=0.5),
    SamplingSettings(top_k=5000, top_p=0.999, temperature=2.0),
    SamplingSettings(top_k=16383, top_p=1e-6),
    SamplingSettings(top_k=20000, top_p=0.5, cfg_scale=3.0),
]
KINDS = ["normal", "mild", "gumbel", "ties", "flat", "extreme", "spike"]


@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("vocab", [16384, 16383, 1000, 37, 1])
def test_sampler_equals_fixed_point_rule(dtype, vocab):
    from aim_rt.plugins.kernels import Kernels

    kernels = Kernels(dtype)
    tdt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(vocab)
    batch = 24
    seeds = torch.arange(batch, device="cuda") * 1_000_003 + vocab
    agree = total = 0
    for si, settings in enumerate(SETTINGS):
        for kind in KINDS:
            logits = random_logits(kind, 2 * batch, vocab, g)
            if dtype == "float16":  # keep the extremes finite in half precision
                logits = logits.clamp(-6e4, 6e4)
            logits = logits.to(tdt)
            step = 3 * si + KINDS.index(kind)
            got, mixed, _ = run_sampler(kernels, logits, seeds, step, settings)
            ref_mixed = ops.cfg_mix(logits[:batch], logits[batch:], settings.cfg_scale, settings.temperature)
            finite = torch.isfinite(ref_mixed)
            assert torch.equal(torch.isfinite(mixed), finite)
            # the kernel fuses the multiply-add: a rounding of the terms apart (relative to the terms, not to the
            # result: u + (c - u) * cfg may cancel, as it does on flat rows)
            c, u = logits[:batch].float(), logits[batch:].float()
            terms = ((c - u).abs() * settings.cfg_scale + u.abs()) / settings.temperature
            assert ((mixed - ref_mixed).abs() <= 1e-6 * terms)[finite].all(), (settings, kind)
            want = fixed_point_draw(mixed, seeds, step, settings.top_k, settings.top_p)
            assert torch.equal(got, want), (settings, kind, (got != want).nonzero()[:4].tolist())
            assert ((got >= 0) & (got < vocab)).all()
            if kind in ("normal", "gumbel"):
                ref = draw(mixed.cpu(), seeds.cpu(), step, settings)
                agree += int((got.cpu() == ref).sum())
                total += batch
    assert agree >= 0.98 * total, (agree, total)


@needs_gpu
def test_sampler_rows_do_not_depend_on_the_batch():
    """A row's token is the same alone, in a batch of 64, and as any row of the batch."""
    from aim_rt.plugins.kernels import Kernels

    kernels = Kernels("bfloat16")
    g = torch.Generator(device="cuda").manual_seed(5)
    logits = random_logits("normal", 128, 16384, g).to(torch.bfloat16)
    seeds = torch.arange(64, device="cuda") + 11
    crowd, _, _ = run_sampler(kernels, logits, seeds, 2, SamplingSettings())
    for i in (0, 17, 63):
        alone, _, _ = run_sampler(kernels, logits[[i, 64 + i]].contiguous(), seeds[i:i + 1].contiguous(), 2,
                                  SamplingSettings())
        assert int(alone[0]) == int(crowd[i])


@needs_gpu
def test_sampler_advances_per_image_indices():
    """With `advance`, image b's block reads its own token index step[b], draws token step[b] exactly as with a
    shared index (the row, seed and index decide it), writes it and its next input at that index, and leaves
    step[b] + 1: the decode step's own advance, with no aim_advance launch."""
    from aim_rt.plugins.kernels import Kernels, SampleParams

    kernels = Kernels("bfloat16")
    g = torch.Generator(device="cuda").manual_seed(13)
    batch, vocab, d, num_tokens = 3, 16384, 64, 8
    logits = random_logits("normal", 2 * batch, vocab, g).to(torch.bfloat16)
    seeds = torch.arange(batch, device="cuda") + 5
    steps = [2, 7, 4]
    step_t = torch.tensor(steps, device="cuda", dtype=torch.int32)
    tokens = torch.full((batch, num_tokens), -1, device="cuda", dtype=torch.long)
    word = torch.randn(vocab, d, device="cuda", generator=g).to(torch.bfloat16)
    pos = torch.randn(num_tokens + 1, d, device="cuda", generator=g).to(torch.bfloat16)
    nxt = torch.zeros(2 * batch, d, device="cuda", dtype=torch.bfloat16)
    s = SamplingSettings()
    p = SampleParams(logits=logits.data_ptr(), logits_stride=logits.stride(0), batch=batch, vocab=vocab,
                     uncond_rows=batch, cfg_scale=s.cfg_scale, temperature=s.temperature, top_k=s.top_k,
                     top_p=s.top_p, seeds=seeds.data_ptr(), step=step_t.data_ptr(), position_offset=1,
                     tokens=tokens.data_ptr(), num_tokens=num_tokens, teacher=None, mixed_out=None,
                     word_emb=word.data_ptr(), pos_emb=pos.data_ptr(), d=d, next_input=nxt.data_ptr(),
                     next_token=None, advance=1)
    kernels.cfg_sample(p, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert step_t.tolist() == [k + 1 for k in steps]
    for b, k in enumerate(steps):
        shared, _, _ = run_sampler(kernels, logits[[b, batch + b]].contiguous(), seeds[b:b + 1].contiguous(), k, s)
        assert int(tokens[b, k]) == int(shared[0])
        assert (tokens[b] >= 0).sum() == 1  # only column k written
        want = (word[tokens[b, k]].float() + pos[k + 1].float()).to(torch.bfloat16)
        assert torch.equal(nxt[b], want) and torch.equal(nxt[batch + b], want)


@needs_gpu
@pytest.mark.parametrize("teacher_forced,d,threads", [(False, 768, None), (True, 768, None), (False, 100, None),
                                                      (False, 1536, None), (False, 2600, None), (False, 1536, 512)])
def test_sampler_outputs_next_input_and_token(teacher_forced, d, threads):
    """tokens[:, k] gets the draw; next_token and both halves of next_input get the token fed on (the teacher's
    when teacher forcing): word_emb[token] + pos_emb[k + offset], rounded once. Widths: under one element per
    thread, two (AiM-XL's 1536), and past the two a thread holds (2600; 1536 with 512 threads)."""
    from aim_rt.plugins.kernels import Kernels

    kernels = Kernels("bfloat16", defines={"SAMPLE_THREADS": threads} if threads else None)
    g = torch.Generator(device="cuda").manual_seed(9)
    batch, vocab, step = 5, 16384, 3
    logits = random_logits("normal", 2 * batch, vocab, g).to(torch.bfloat16)
    seeds = torch.arange(batch, device="cuda") + 1
    teacher = torch.randint(0, vocab, (batch, 8), device="cuda", generator=g) if teacher_forced else None
    got, mixed, emb = run_sampler(kernels, logits, seeds, step, SamplingSettings(), teacher=teacher, d=d)
    assert torch.equal(got, fixed_point_draw(mixed, seeds, step, 600, 0.98))
    fed = teacher[:, step] if teacher_forced else got
    assert torch.equal(emb["next_token"], fed)
    want = (emb["word"][fed].float() + emb["pos"][step + 1].float()).to(torch.bfloat16)
    assert torch.equal(emb["next_input"][:batch], want) and torch.equal(emb["next_input"][batch:], want)


def test_fixed_point_rule_matches_the_float_reference_on_cpu():
    """The model above agrees with aim_rt.sampling.draw on ordinary rows (CPU: no kernel needed)."""
    g = torch.Generator().manual_seed(0)
    mixed = 15 * torch.randn(64, 4096, generator=g)
    seeds = torch.arange(64)
    for settings in SETTINGS[:3]:
        got = fixed_point_draw(mixed, seeds, 4, settings.top_k, settings.top_p)
        assert (got == draw(mixed, seeds, 4, settings)).float().mean() >= 0.95
