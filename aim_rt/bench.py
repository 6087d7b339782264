"""`aim-rt bench`: latency and throughput of every available backend, against the memory-bandwidth floor.

A model is a checkpoint or a preset name (random weights at the official shapes, VQ-f16 with random weights).
Warm-up (compilation, graph capture) is excluded; each cell is the median of `repeats` timed runs, with CUDA
synchronisation around each region. The floor is the time to read the weights a step touches once and to
read + write every row's conv and SSM state once, at the copy bandwidth measured in the same process.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import AiMConfig, VQConfig, preset
from .loading import load_model, random_model, resolve_dtype
from .sampling import SamplingSettings
from .vq import VQModel


@dataclass
class BenchRow:
    model: str
    backend: str
    dtype: str
    batch: int
    ms_per_step: float
    autoregressive_ms: float
    vq_ms: float
    end_to_end_ms: float
    images_per_s: float
    peak_memory_gb: float
    floor_ms_per_step: float
    ratio_to_floor: float
    note: str = ""


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, warmup: int = 20, reps: int = 10) -> float:
    """Bytes moved per second (read + write) by a device-to-device copy: the best of `reps` copies, timed with
    CUDA events after `warmup` copies. (Five host-timed copies right after an idle spell read 3.6-4.1 TB/s on
    the same H200 in different processes: the clocks were still ramping up.)"""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / min(times)


def step_bytes(cfg: AiMConfig, batch: int, elem_bytes: int) -> int:
    """Weights one decode step must read (the adaLN is per sequence) + state read and written, 2B rows."""
    per_layer = (cfg.d_model * cfg.d_in_proj + cfg.conv_dim * (cfg.d_conv + 1) + cfg.d_inner * cfg.d_model
                 + cfg.d_model + cfg.d_inner + 3 * cfg.nheads)
    weights = cfg.n_layer * per_layer + cfg.vocab_size * cfg.d_model + 2 * cfg.d_model
    state_per_row = cfg.n_layer * (cfg.conv_dim * cfg.d_conv + cfg.nheads * cfg.headdim * cfg.d_state)
    return (weights + 2 * (2 * batch) * state_per_row) * elem_bytes


def op_bytes(cfg: AiMConfig, batch: int, elem: int, folded: bool = False, normed_in: bool = False) -> dict[str, int]:
    """Bytes each kind of op in a decode step must move per launch (2B rows with CFG): its weights once, its
    inputs read, its outputs written, states read and written once. Tiny per-head vectors are counted too.
    `folded`: the step folds the residual add into out_proj (CudaBackend.folds), so every norm after a
    layer only reads the summed residual and every out_proj moves it and the gate instead of writing its output
    (the first norm, of the input embedding, is whole); a kind's bytes are then the average over its launches.
    `normed_in` (with `folded`): in_proj norms its own x after the first layer (CudaBackend.norm_folds), so the
    norm kernel runs once (whole); each out_proj but the last also reads the next layer's float32 gm and writes
    x * gm and its 8-column tiles' float32 sums of squares, which those in_projs read with the shift."""
    R, d, e, L = 2 * batch, cfg.d_model, elem, cfg.n_layer
    norm = R * d * (3 * e + 8 + 2 * e) + d * e  # input, gate, out; residual fp32 in/out; shift and scale
    light = R * d * (4 + 3 * e) + d * e  # summed residual in; out; shift and scale
    state = cfg.nheads * cfg.headdim * cfg.d_state + cfg.conv_dim * cfg.d_conv
    out_proj = cfg.d_inner * d * e + R * (cfg.d_inner + d) * e
    final = norm + d * e  # a second norm weight
    if folded:  # residual in and out and the gate, no output
        norm_avg, out_avg, final = (norm + (L - 1) * light) // L, out_proj + R * d * 8, light + d * e
    else:
        norm_avg, out_avg = norm, out_proj
    in_proj = d * cfg.d_in_proj * e + R * (d + cfg.d_in_proj) * e
    if folded and normed_in:
        norm_avg, parts = norm, R * d // 8 * 4
        in_proj = (L * in_proj + (L - 1) * (R * d * e + parts)) // L  # + the shift and the tile sums
        out_avg = (L * out_avg + (L - 1) * (R * d * (4 + e) + parts)) // L  # + gm in; x * gm and tile sums out
    return {
        "residual_norm": norm_avg,
        "in_proj": in_proj,
        "selective_state_update": R * (2 * state * e + (cfg.d_in_proj + cfg.d_inner) * e + cfg.nheads * 4)
                                  + (cfg.conv_dim * (cfg.d_conv + 1) + 3 * cfg.nheads + cfg.d_inner) * e,
        "out_proj": out_avg,
        "final_norm": final,
        "lm_head": cfg.vocab_size * d * e + R * (d + cfg.vocab_size) * e,
        "sample": R * cfg.vocab_size * e + 2 * batch * d * e,
    }


def kernel_table(models: list[str], batches: list[int], dtype: str = "bfloat16", device: str = "cuda",
                 progress=None) -> dict:
    """`aim-rt bench --kernels`: per step of the cuda backend, each kind of op's time, the bytes it must move and
    the bandwidth it achieved against the copy bandwidth; the graph-replayed step against the sum of its parts."""
    from .cuda_backend import CudaBackend

    dev = torch.device(device)
    bandwidth = copy_bandwidth(dev)
    elem = torch.empty(0, dtype=resolve_dtype(dtype)).element_size()
    settings = SamplingSettings()
    rows = []
    for spec in models:
        model, label = _model(spec, dev, dtype, precompile=True)
        backend = CudaBackend(model)
        for batch in batches:
            classes, seeds = torch.arange(batch) % model.config.num_classes, torch.arange(batch)
            backend.sample(classes, seeds, settings)
            step_s, _ = _timed(lambda b=backend: b.sample(classes, seeds, settings), dev, 3)
            step_us = step_s / model.config.num_tokens * 1e6
            phases = backend.phase_times(batch, settings)
            timing = backend.op_timings(batch, settings)
            nbytes = op_bytes(model.config, batch, elem, backend.folds(2 * batch), backend.norm_folds(2 * batch))
            in_step = (timing["timeline"] or {}).get("in_step_us_per_launch") or {}
            ops = []
            for kind, t in timing["ops"].items():
                gbps = nbytes[kind] / (t["us_per_launch"] * 1e-6) / 1e9
                ops.append({"op": kind, **t, "us_per_step": t["us_per_launch"] * t["launches_per_step"],
                            "bytes_per_launch": nbytes[kind], "achieved_GBps": gbps,
                            "fraction_of_copy_bandwidth": gbps * 1e9 / bandwidth})
                if kind in in_step:  # what it adds to the replayed step (in_step_costs)
                    ops[-1]["in_step_us_per_step"] = in_step[kind] * t["launches_per_step"]
            parts = sum(o["us_per_step"] for o in ops)
            row = {"model": label, "dtype": dtype, "batch": batch, "step_us_graph": step_us,
                   "sum_of_ops_us": parts, "gaps_us": step_us - parts,
                   "kernels_per_step": timing["kernels_per_step"], "replay_timeline": timing["timeline"],
                   **phases,
                   "floor_us": step_bytes(model.config, batch, elem) / bandwidth * 1e6, "ops": ops}
            rows.append(row)
            if progress:
                progress(row)
        del model, backend
        torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(dev), "copy_bandwidth_TBps": bandwidth / 1e12,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}


def in_step_costs(spans: list[tuple[float, float]], kinds: list[str]) -> dict[str, float] | None:
    """Each kind of op's cost inside the replayed step, in µs per launch: `spans` are the (start, end) times of
    the kernels of whole consecutive steps as the profiler saw them, `kinds` the op kind of each kernel one step
    launches, in launch order. Under programmatic dependent launch a kernel starts before its predecessor ends
    and waits, so its time alone says little about the step; what it adds to the step is how much later it ends
    than every kernel before it. The first kernel (nothing before it to measure from) is left out. None where
    the spans are not whole steps of `kinds`."""
    if not kinds or len(spans) < 2 or len(spans) % len(kinds):
        return None
    spans = sorted(spans)  # launch order: a kernel starts only after its predecessor has started
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    last_end = spans[0][1]
    for i in range(1, len(spans)):
        kind = kinds[i % len(kinds)]
        end = spans[i][1]
        total[kind] = total.get(kind, 0.0) + max(0.0, end - last_end)
        count[kind] = count.get(kind, 0) + 1
        last_end = max(last_end, end)
    return {kind: total[kind] / count[kind] for kind in dict.fromkeys(kinds) if kind in count}


def format_kernel_table(result: dict) -> str:
    lines = [f"{result['device']}, copy bandwidth {result['copy_bandwidth_TBps']:.2f} TB/s, {result['date']}"]
    for row in result["rows"]:
        lines.append(f"\n{row['model']} {row['dtype']} batch {row['batch']}: step {row['step_us_graph']:.1f} µs "
                     f"(graph replay), ops alone {row['sum_of_ops_us']:.1f} µs, gaps {row['gaps_us']:.1f} µs, "
                     f"{row['kernels_per_step']} kernels per step, floor {row['floor_us']:.1f} µs")
        if "prefill_ms" in row:
            lines.append(f"  phases: prefill {row['prefill_ms']:.1f} ms, host loop of graph replays "
                         f"{row['replays_us_per_step']:.1f} µs per step")
        tl = row.get("replay_timeline") or {}
        if tl:
            lines.append(f"  replayed graph under the profiler: {tl['kernel_us_per_step']:.1f} µs in kernels, "
                         f"{tl['idle_us_per_step']:.1f} µs idle between them per step")
        # "alone": each kind timed by itself; "in step": what it adds to the replayed step (in_step_costs)
        lines.append(f"  {'op':<24}{'per step':>9}{'µs each':>10}{'µs/step':>10}{'MB each':>10}{'GB/s':>9}{'of copy':>9}"
                     f"{'in step µs/step':>17}")
        span = tl.get("span_us_per_step")
        for o in row["ops"]:
            cell = ""
            if "in_step_us_per_step" in o:
                cell = f"{o['in_step_us_per_step']:.1f}" + (f" ({o['in_step_us_per_step'] / span:.0%})" if span else "")
            lines.append(f"  {o['op']:<24}{o['launches_per_step']:>9}{o['us_per_launch']:>10.2f}{o['us_per_step']:>10.1f}"
                         f"{o['bytes_per_launch'] / 1e6:>10.3f}{o['achieved_GBps']:>9.0f}"
                         f"{o['fraction_of_copy_bandwidth']:>9.0%}{cell:>17}".rstrip())
    return "\n".join(lines)


def _model(spec: str, device, dtype, precompile: bool = False):
    """A model by preset name (random weights, and a random VQ) or checkpoint. `precompile`: start compiling
    the cuda backend's kernels first, as `aim-rt generate --backend cuda` does (they build while the model does)."""
    try:
        cfg = preset(spec)
    except Exception:
        return load_model(spec, device=device, dtype=dtype), spec
    if precompile:
        from .cuda_backend import precompile as start

        start(cfg, dtype, device)
    model = random_model(cfg, seed=0, device=device, dtype=dtype)
    torch.manual_seed(0)
    model.vq = VQModel(VQConfig()).to(device, resolve_dtype(dtype)).eval()
    if precompile:  # cuDNN's loading (warm_cudnn) done before any backend captures a graph
        from .cuda_backend import join_cudnn_warmup

        join_cudnn_warmup(torch.device(device))
    return model, f"{spec} (random weights)"


def parse_cases(cases: str) -> dict[str, list[int]]:
    """"AiM-B:1,AiM-XL:4,AiM-B:16" as {model: [batches]}, models and batches in the order given."""
    models: dict[str, list[int]] = {}
    for case in cases.split(","):
        name, sep, batch = case.partition(":")
        if not sep or not name or not batch.isdigit() or int(batch) < 1:
            raise ValueError(f"a case is model:batch (e.g. AiM-B:16), not {case!r}")
        models.setdefault(name, []).append(int(batch))
    return models


def step_study(cases: str, device) -> tuple[dict, dict[str, list[int]]]:
    """For scripts that compare backends' whole steps: the result header (device, date, copy bandwidth, empty
    cases) and the cases by model (parse_cases)."""
    models = parse_cases(cases)
    result = {"device": torch.cuda.get_device_name(device), "date": time.strftime("%Y-%m-%d"),
              "copy_bandwidth_TBps": copy_bandwidth(device) / 1e12, "cases": {}}
    return result, models


def alternate_steps(backends: dict, batch: int, settings: SamplingSettings, rounds: int) -> dict[str, list[float]]:
    """Graph-replayed µs per decode step of each backend (prefill excluded), `rounds` times, the backends
    alternating within each round (after a warm sample of this batch size each)."""
    times: dict[str, list[float]] = {v: [] for v in backends}
    for _ in range(rounds):
        for v, b in backends.items():
            times[v].append(b.phase_times(batch, settings)["replays_us_per_step"])
    return times


def compare_steps(label: str, model, backends: dict, batches: list[int], settings: SamplingSettings, rounds: int,
                  result: dict) -> None:
    """For each batch: a warm sample of every backend (capture), then `rounds` of alternate_steps. Each case's row
    goes into result["cases"] and is printed: every backend's least µs per step, all runs, and whether its tokens
    equal the first backend's (only meaningful where both compute the same model)."""
    for batch in batches:
        classes, seeds = torch.arange(batch) % model.config.num_classes, torch.arange(batch)
        tokens = {v: b.sample(classes, seeds, settings) for v, b in backends.items()}
        times = alternate_steps(backends, batch, settings, rounds)
        first = next(iter(tokens.values()))
        row = {"us_per_step": {v: min(t) for v, t in times.items()}, "all": times,
               "tokens_equal_first": {v: bool(torch.equal(first, t)) for v, t in list(tokens.items())[1:]}}
        result["cases"][f"{label} b{batch}"] = row
        print(f"{label} b{batch}: " + ", ".join(f"{v} {u:.1f}" for v, u in row["us_per_step"].items())
              + f" µs per step; tokens equal to the first's: {row['tokens_equal_first']}", flush=True)


def run_study(cases: str, make_backends, rounds: int, out, device: str = "cuda") -> dict:
    """The step-comparison scripts' run: for each model of `cases` ("AiM-B:1,AiM-XL:4"), bf16 random weights,
    the backends make_backends(model) returns ({name: backend}) compared by compare_steps; the result (device,
    date, copy bandwidth, cases) written to the path `out` as JSON and returned. TF32 off."""
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device(device)
    settings = SamplingSettings()
    result, models = step_study(cases, dev)
    for name, batches in models.items():
        model, _ = _model(name, dev, "bfloat16", precompile=True)
        backends = make_backends(model)
        compare_steps(name, model, backends, batches, settings, rounds, result)
        del backends, model
        torch.cuda.empty_cache()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def replay_us(graph, launches: int, replays: int = 5, before=None) -> float:
    """Median device time per launch (µs) of a captured CUDA graph of `launches` launches, over `replays`
    replays timed with CUDA events; `before()` runs ahead of each replay (e.g. resets a counter)."""
    times = []
    for _ in range(replays):
        if before:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / launches)
    return statistics.median(times)


def _timed(fn, device, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def make(backend: str, model):
    if backend == "torch":
        from .backends import TorchBackend

        return TorchBackend(model)
    if backend == "cuda":
        from .cuda_backend import CudaBackend

        return CudaBackend(model)
    if backend == "mamba-ssm":
        raise RuntimeError("mamba-ssm is not installed here" if not _has("mamba_ssm")
                           else "the mamba-ssm comparison backend is not written yet")
    raise ValueError(f"unknown backend {backend!r}")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run_bench(models: list[str], batches: list[int], backends: list[str], dtype: str = "bfloat16",
              repeats: int = 3, device: str = "cuda", progress=None) -> dict:
    dev = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    bandwidth = copy_bandwidth(dev)
    elem = torch.empty(0, dtype=resolve_dtype(dtype)).element_size()
    settings = SamplingSettings()  # the official README call: cfg 5, top-k 600, top-p 0.98
    rows: list[BenchRow] = []
    for spec in models:
        model, label = _model(spec, dev, dtype, precompile="cuda" in backends)
        cfg = model.config
        for name in backends:
            try:
                backend = make(name, model)
            except Exception as e:  # a backend this machine cannot run: say so in the table
                rows.append(BenchRow(label, name, dtype, 0, *[float("nan")] * 9, note=f"skipped: {e}"))
                continue
            for batch in batches:
                classes = torch.arange(batch) % cfg.num_classes
                seeds = torch.arange(batch)
                reps = repeats if name != "torch" else max(1, min(repeats, 2))
                backend.sample(classes, seeds, settings)  # warm-up: compile, capture
                tokens = backend.sample(classes, seeds, settings)
                backend.decode(tokens)
                torch.cuda.reset_peak_memory_stats(dev)
                ar, tokens = _timed(lambda: backend.sample(classes, seeds, settings), dev, reps)
                # decoding is short (1-40 ms): a median of 3 was at the mercy of one slow call
                vq, _ = _timed(lambda: backend.decode(tokens), dev, max(reps, 20) if name != "torch" else reps)
                e2e, _ = _timed(lambda: backend.decode(backend.sample(classes, seeds, settings)), dev, reps)
                floor = step_bytes(cfg, batch, elem) / bandwidth
                per_step = ar / cfg.num_tokens
                row = BenchRow(label, name, dtype, batch, per_step * 1e3, ar * 1e3, vq * 1e3, e2e * 1e3,
                               batch / e2e, torch.cuda.max_memory_allocated(dev) / 2**30, floor * 1e3,
                               per_step / floor)
                rows.append(row)
                if progress:
                    progress(row)
        del model
        torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(dev),
        "copy_bandwidth_TBps": bandwidth / 1e12,
        "torch": torch.__version__,
        "settings": settings.to_dict(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": [asdict(r) for r in rows],
    }
