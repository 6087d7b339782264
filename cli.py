"""The `aim-rt` command line (installed as aim_rt.cli)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

try:  # typer >= 0.2x parses with its own copy of click; its usage errors are these classes, not click's
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer
    from click import exceptions as click_errors

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="aim-rt: fast, faithful sampling from AiM checkpoints.")
console = Console(stderr=True)


def default_model_path() -> Path:
    """The tiny digits AiM shipped inside the package (used when no model is named)."""
    import aim_rt

    return Path(aim_rt.__file__).resolve().parent / "data" / "digits"


def say(message: str, style: str | None = None) -> None:
    """Print to stderr as is: paths and names the user chose are never read as rich markup, nor wrapped."""
    console.print(message, style=style, markup=False, highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 2) -> None:
    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def user_errors(out: Path | None = None):
    """AiM errors and the operating system's refusals (full disk, read-only, names too long) as one line, exit 2."""
    from aim_rt.errors import AiMError, WriteError
    from aim_rt.validation import describe_os_error

    try:
        yield
    except WriteError as e:
        _fail(describe_os_error(e.cause, out))  # says what is kept in `out`
    except AiMError as e:
        _fail(str(e))
    except OSError as e:
        _fail(describe_os_error(e, out))


@dataclass
class GenerateFlags:
    """What `generate` was asked, checked for what can be checked without the model."""

    model_ref: str
    out: Path
    classes: Optional[str]
    images_per_class: Optional[int]
    num_images: Optional[int]
    sampling: dict  # the sampling flags given (None: the model's recommendation, else the official default)
    prefix: Optional[np.ndarray]
    artifacts: Optional[Path]


def check_generate_flags(model, out, classes, images_per_class, num_images, sampling, prefix, artifacts,
                         engines, batch_size, device, dtype, backend) -> GenerateFlags:
    from aim_rt.backends import available_backends
    from aim_rt.errors import UsageError
    from aim_rt.loading import resolve_device, resolve_dtype
    from aim_rt.sampling import SamplingSettings
    from aim_rt.validation import (check_artifacts_dir, check_batch_size, check_out_dir, load_prefix,
                                   parse_class_spec)

    if artifacts is not None and engines is not None:
        raise UsageError("--engines is the old name of --artifacts; pass only --artifacts")
    if backend not in available_backends():
        raise UsageError(f"unknown backend {backend!r}; available here: {', '.join(available_backends())}")
    resolve_dtype(dtype)
    resolve_device(device)
    check_batch_size(batch_size)
    if classes is not None:
        parse_class_spec(classes, num_classes=1 << 62)  # the syntax now; the range once the model is known
    SamplingSettings(**{k: v for k, v in sampling.items() if v is not None})  # each given value in range
    return GenerateFlags(model or str(default_model_path()), check_out_dir(out), classes, images_per_class,
                         num_images, sampling, None if prefix is None else load_prefix(prefix),
                         check_artifacts_dir(artifacts if artifacts is not None else engines,
                                             "--artifacts" if engines is None else "--engines"))


def plan_run(ckpt, flags: GenerateFlags, seed: int, npz: bool, grid: bool):
    """The images and settings of a run, from the checkpoint's config, checked before any module is built."""
    from aim_rt import SamplingSettings
    from aim_rt.config import VQConfig
    from aim_rt.errors import CheckpointError, UsageError
    from aim_rt.generate import plan_images
    from aim_rt.validation import check_fits, check_prefix, count_images, parse_class_spec

    cfg = ckpt.stage2_config
    if cfg is None:
        raise CheckpointError(f"{ckpt.source}: no stage-2 config found; put config.json beside the weights or "
                              "pass --config")
    spec = parse_class_spec(flags.classes if flags.classes is not None
                            else ("all" if cfg.num_classes <= 16 else "random"), cfg.num_classes)
    if flags.classes is None and spec.random and flags.images_per_class is not None:
        raise UsageError(f"this model has {cfg.num_classes} classes, so the default --classes is random, which takes "
                         "--num-images N; or pass --classes (e.g. 0-9) with -n")
    total = count_images(spec, flags.images_per_class, flags.num_images)
    side = cfg.grid_size * (ckpt.vq_config or VQConfig()).downsample
    check_fits(total, cfg.num_tokens, side, flags.out, npz, grid)
    check_prefix(flags.prefix, total, cfg.num_tokens, cfg.vocab_size)
    per_class = total if spec.random else total // spec.count
    plan = plan_images(None if spec.random else spec.classes(), per_class, total, cfg.num_classes, seed)
    unknown = set(ckpt.sampling_defaults) - set(SamplingSettings().to_dict())
    if unknown:
        raise CheckpointError(f"{ckpt.source}: config.json 'aim_rt_sampling' has unknown field(s) {sorted(unknown)}; "
                              f"known: {', '.join(SamplingSettings().to_dict())}")
    defaults = {**SamplingSettings().to_dict(), **ckpt.sampling_defaults}
    settings = SamplingSettings(**{**defaults, **{k: v for k, v in flags.sampling.items() if v is not None}})
    return plan, settings


def check_job_dir(ckpt, flags: GenerateFlags, plan, settings, shard, overwrite: bool, **record_fields) -> None:
    """The output directory can take this job (no other job holds it, no other plan recorded there): said
    before the model is built. Rank 0 looks and every rank learns the verdict, so a refusal stops all ranks.
    generate.run checks again under the lock."""
    from aim_rt.errors import AiMError, OutputError
    from aim_rt.generate import check_out_dir_for, job_record
    from aim_rt.validation import check_prefix, describe_os_error

    problem = None
    if shard.is_main:
        cfg = ckpt.stage2_config
        prefix = check_prefix(flags.prefix, len(plan), cfg.num_tokens, cfg.vocab_size)
        record = job_record(plan, settings, model_id=ckpt.sha256(), prefix=prefix, **record_fields)
        try:
            check_out_dir_for(flags.out, record, overwrite)
        except AiMError as e:
            problem = str(e)
        except OSError as e:
            problem = describe_os_error(e)
    problem = shard.share(problem)
    if problem:
        raise OutputError(problem)


def load_for_run(ckpt, vq: Optional[str], device: str, dtype: str, shard, backend: str = ""):
    """Build the model (one GPU per rank under torchrun) and make sure it can decode images. With the cuda
    backend its kernels start compiling first, so the compile and the model build overlap."""
    from aim_rt import load_vq
    from aim_rt.errors import AiMError
    from aim_rt.loading import attach_vq, build, dtype_name, resolve_device, resolve_dtype

    if shard.world > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{shard.local_rank % torch.cuda.device_count()}"
            torch.cuda.set_device(device)
    if backend == "cuda" and ckpt.stage2_config is not None:
        from aim_rt.cuda_backend import precompile

        precompile(ckpt.stage2_config, dtype_name(resolve_dtype(dtype)), resolve_device(device))
    loaded = build(ckpt, device, dtype)
    if vq is not None:
        attach_vq(loaded.model, load_vq(vq))
    if loaded.model.vq is None:
        raise AiMError(f"{loaded.source} has no VQ tokenizer to decode images with; pass one with --vq PATH")
    return loaded


def sample_with_progress(engine, plan, settings, flags: GenerateFlags, loaded, shard, **run_options):
    """generate.run under a progress bar (rank 0 only); Ctrl-C says what is kept."""
    from aim_rt.generate import my_batches, run

    quiet = not shard.is_main
    done = 0
    mine = sum(len(b) for b in my_batches(len(plan), run_options["batch_size"], shard))
    with Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, disable=quiet) as bar:
        task = bar.add_task("sampling", total=mine)

        def advance(n: int) -> None:
            nonlocal done
            done += n
            bar.advance(task, n)

        try:
            return run(engine, plan, settings, flags.out, model_id=loaded.sha256 or loaded.source, progress=advance,
                       shard=shard, **run_options)
        except KeyboardInterrupt:
            bar.stop()
            say(f"interrupted: {done} finished images are kept in {flags.out}; rerun the same command to resume.",
                "yellow")
            raise typer.Exit(130)


def report_run(result, shard) -> None:
    if not shard.is_main:
        return
    if result.recomputed:
        say(f"remade {len(result.recomputed)} damaged finished images (first: {result.recomputed[0]})", "yellow")
    note = f" ({result.skipped} already there)" if result.skipped else ""
    say(f"made {result.made} images{note} in {result.out_dir / 'images'}"
        + (" on rank 0 (each rank wrote its own share)" if shard.world > 1 else ""))
    for path in result.written:
        say(f"wrote {path}")


@app.command()
def generate(
    model: Optional[str] = typer.Argument(None, help="Checkpoint directory or file, hub id (hp-l33/aim-base) or preset "
                                          "(AiM-B/L/XL). Default: the embedded digits model."),
    out: str = typer.Option("samples", "--out", "-o", help="Output directory (one job; resumable)."),
    classes: Optional[str] = typer.Option(None, "--classes", "-c", help="'3', '0,5,9', '0-9', 'all' or 'random'. "
                                          "Default: all classes if the model has at most 16, else random."),
    images_per_class: Optional[int] = typer.Option(None, "--images-per-class", "-n",
                                                   help="Images per listed class (default 4; not with random)."),
    num_images: Optional[int] = typer.Option(None, "--num-images", help="Images with --classes random (default 16)."),
    batch_size: int = typer.Option(16, "--batch-size", "-b"),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale", help="Classifier-free guidance, 0..1000 (official 5)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep the k most likely tokens, 0 = all (official 600)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus mass in (0, 1], 1 = off (official 0.98)."),
    temperature: Optional[float] = typer.Option(None, "--temperature",
                                                help="0.001..1000; applied (the official code ignores it)."),
    position_convention: str = typer.Option("official", "--position-convention",
                                            help="'official': token k at position k+1; 'training': at k."),
    seed: int = typer.Option(0, "--seed", min=0, help="Base seed; each image's seed derives from it, its class and index."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    backend: str = typer.Option("torch", "--backend", help="torch (the reference), cuda (fused kernels + CUDA graphs), onnxruntime or tensorrt."),
    artifacts: Optional[Path] = typer.Option(None, "--artifacts", help="Directory made by `aim-rt export`, for the "
                                             "onnxruntime/tensorrt backends (onnxruntime: exported on first use; "
                                             "default: a cache keyed by the weights)."),
    engines: Optional[Path] = typer.Option(None, "--engines", hidden=True, help="Deprecated name of --artifacts."),
    npz: bool = typer.Option(True, "--npz/--no-npz", help="Write samples.npz (arr_0: N×H×W×3 uint8, arr_1: labels)."),
    grid: bool = typer.Option(True, "--grid/--no-grid", help="Write grid.png."),
    grid_cols: Optional[int] = typer.Option(None, "--grid-cols", min=1),
    prefix: Optional[Path] = typer.Option(None, "--prefix", help=".npy of given first tokens (integers), (m,) or (N, m)."),
    config: Optional[Path] = typer.Option(None, "--config", help="config.json for a bare weights file."),
    vq: Optional[str] = typer.Option(None, "--vq", help="VQ tokenizer to decode with, when the checkpoint has none "
                                     "(e.g. LlamaGen's vq_ds16_c2i.pt)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard the job --out holds (only files it wrote) "
                                   "instead of resuming."),
) -> None:
    """Sample images to PNGs, tokens.npz, samples.npz and grid.png; rerun the same command to resume."""
    if backend == "cuda":  # first: NVRTC compiles the model-independent kernels while torch loads
        from aim_rt.plugins.kernels import precompile_early

        precompile_early(dtype)
    from aim_rt.checkpoint import open_checkpoint
    from aim_rt.distributed import from_environment
    from aim_rt.generate import open_backend

    sampling = {"cfg_scale": cfg_scale, "top_k": top_k, "top_p": top_p, "temperature": temperature,
                "position_convention": position_convention}
    with user_errors(Path(out)):
        flags = check_generate_flags(model, out, classes, images_per_class, num_images, sampling, prefix, artifacts,
                                     engines, batch_size, device, dtype, backend)
        shard = from_environment()
        ckpt = open_checkpoint(flags.model_ref, config)
        plan, settings = plan_run(ckpt, flags, seed, npz, grid)
        check_job_dir(ckpt, flags, plan, settings, shard, overwrite, base_seed=seed, batch_size=batch_size,
                      backend=backend, dtype=dtype)
        loaded = load_for_run(ckpt, vq, device, dtype, shard, backend)
        del ckpt  # the module holds the weights now; the state dicts read from disk can go
        engine = open_backend(backend, loaded.model, model_sha256=loaded.sha256, source=loaded.source, dtype=dtype,
                              artifacts=flags.artifacts)
        if shard.is_main:
            cfg = loaded.model.config
            ranks = f" · {shard.world} ranks" if shard.world > 1 else ""
            say(f"model {loaded.source} ({cfg.n_layer} layers, d={cfg.d_model}) · backend {backend} · "
                f"{loaded.model.device} {dtype}{ranks} · {len(plan)} images → {flags.out}")
        result = sample_with_progress(engine, plan, settings, flags, loaded, shard, base_seed=seed,
                                      batch_size=batch_size, dtype=dtype, prefix=flags.prefix, npz=npz, grid=grid,
                                      grid_cols=grid_cols, overwrite=overwrite)
    report_run(result, shard)


@app.command()
def export(
    model: Optional[str] = typer.Argument(None, help="Checkpoint, hub id or preset. Default: the embedded model."),
    out: str = typer.Option(..., "--out", "-o", help="Export directory (new, empty, or an earlier aim-rt export)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16 (the VQ graph stays float32 "
                              "with bfloat16: ONNX convolutions have no bfloat16)."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (18-21)."),
    prefix_len: int = typer.Option(0, "--prefix-len", help="Prefill graph takes this many given first tokens."),
    vq_uint8: bool = typer.Option(False, "--vq-uint8", help="VQ graph outputs uint8 NHWC images."),
    fmt: str = typer.Option("onnx", "--format", help="onnx, or trt: also build TensorRT engines into OUT/engines."),
    batch_min: int = typer.Option(1, "--batch-min"),
    batch_opt: int = typer.Option(16, "--batch-opt"),
    batch_max: int = typer.Option(64, "--batch-max"),
    config: Optional[Path] = typer.Option(None, "--config", help="config.json for a bare weights file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Export into a non-empty directory that is not an "
                                   "aim-rt export (its other files are kept)."),
) -> None:
    """Export the prefill/step graphs (custom-op and portable) and the VQ decoder to ONNX, with a manifest;
    with --format trt, build TensorRT engines from them too."""
    from aim_rt.loading import load, resolve_dtype
    from aim_rt.validation import check_export_request, check_out_dir

    try:
        from aim_rt.exporters.onnx_export import OPSETS, check_export_dir, export_onnx
    except ImportError as e:
        _fail(f"exporting needs onnx: pip install 'aim-rt[onnx]' ({e})")
    with user_errors():  # no finished images to speak of here
        check_export_request(fmt, batch_min, batch_opt, batch_max, opset, OPSETS)
        resolve_dtype(dtype)
        out = check_out_dir(out)  # a str until checked: Path('') would silently be the current directory
        check_export_dir(out, overwrite)
        loaded = load(model or str(default_model_path()), config=config)
        with console.status(Text(f"exporting {loaded.source} ({dtype}, opset {opset})")):
            manifest = export_onnx(loaded.model, out, dtype=dtype, opset=opset, prefix_len=prefix_len,
                                   vq_uint8=vq_uint8, model_sha256=loaded.sha256, source=loaded.source,
                                   overwrite=overwrite)
    for name, graph in manifest["graphs"].items():
        say(f"wrote {out / graph['file']}  ({name})")
    say(f"wrote {out / 'manifest.json'}")
    if fmt == "trt":
        build_trt_engines(out, batch_min, batch_opt, batch_max)


def build_trt_engines(out: Path, batch_min: int, batch_opt: int, batch_max: int) -> None:
    from aim_rt.engines.builder import build_engines
    from aim_rt.engines.plan_meta import BatchRange

    with user_errors():
        results = build_engines(out, batch=BatchRange(batch_min, batch_opt, batch_max), log=say)
    if not any(r.ok for r in results):
        _fail("no engine could be built (see the messages above)")


@app.command()
def bench(
    models: str = typer.Option("AiM-B", "--models", help="Comma-separated presets (random weights) or checkpoints."),
    batches: str = typer.Option("1,16", "--batches", help="Comma-separated batch sizes."),
    backends: str = typer.Option("torch,cuda", "--backends", help="Comma-separated: torch, cuda, mamba-ssm."),
    dtype: str = typer.Option("bfloat16", "--dtype"),
    repeats: int = typer.Option(3, "--repeats", min=1),
    json_out: Path = typer.Option(Path("bench.json"), "--json", help="Where to write the results."),
    kernels: bool = typer.Option(False, "--kernels", help="Instead: the cuda backend's step, op by op (time, bytes "
                                 "it must move, achieved bandwidth, kernels per step)."),
) -> None:
    """Time sampling (ms/step, autoregressive, VQ, end to end, images/s, peak memory, ratio to the floor)."""
    import json

    if kernels or "cuda" in backends:  # first: NVRTC compiles the model-independent kernels while torch loads
        from aim_rt.plugins.kernels import precompile_early

        precompile_early(dtype)
    import torch

    from aim_rt.bench import run_bench

    if not torch.cuda.is_available():
        _fail("bench measures GPU backends and no CUDA GPU is visible to torch")
    table = Table(title="aim-rt bench")
    for col in ("model", "backend", "batch", "ms/step", "AR ms", "VQ ms", "e2e ms", "img/s", "peak GB", "floor ms/step",
                "x floor"):
        table.add_column(col)

    def show(row) -> None:
        say(f"{row.model} {row.backend} b={row.batch}: {row.end_to_end_ms:.1f} ms end to end")

    try:
        batch_sizes = [int(b) for b in batches.split(",")]
    except ValueError:
        _fail(f"--batches {batches!r}: give comma-separated integers, e.g. 1,16")
    if kernels:
        from aim_rt.bench import format_kernel_table, kernel_table

        result = kernel_table([m.strip() for m in models.split(",")], batch_sizes, dtype,
                              progress=lambda row: say(f"{row['model']} b={row['batch']}: step "
                                                       f"{row['step_us_graph']:.1f} µs"))
        print(format_kernel_table(result))
        json_out.write_text(json.dumps(result, indent=1) + "\n")
        say(f"wrote {json_out}")
        return
    result = run_bench([m.strip() for m in models.split(",")], batch_sizes,
                       [b.strip() for b in backends.split(",")], dtype, repeats, progress=show)
    for r in result["rows"]:
        table.add_row(r["model"], r["backend"] + (f" ({r['note']})" if r["note"] else ""), str(r["batch"]),
                      *(f"{r[k]:.3g}" for k in ("ms_per_step", "autoregressive_ms", "vq_ms", "end_to_end_ms",
                                                "images_per_s", "peak_memory_gb", "floor_ms_per_step",
                                                "ratio_to_floor")))
    Console().print(table)
    json_out.write_text(json.dumps(result, indent=1) + "\n")
    say(f"{result['device']}, copy bandwidth {result['copy_bandwidth_TBps']:.2f} TB/s; wrote {json_out}")


@app.command()
def doctor() -> None:
    """What this machine can run: GPU, CUDA, TensorRT, onnxruntime providers, cuda-python, and the backends."""
    from aim_rt.doctor import report

    info = report()
    table = Table(title="aim-rt doctor")
    table.add_column("what")
    table.add_column("here")
    for key, value in info.items():
        if key != "backends":
            table.add_row(key, Text("no" if value is False else "—" if value is None else str(value)))
    for name, verdict in info["backends"].items():
        table.add_row(f"generate --backend {name}", Text(verdict))  # verdicts hold "pip install 'aim-rt[onnx]'"
    Console().print(table)


@app.command()
def info(
    model: Optional[str] = typer.Argument(None, help="Checkpoint, hub id or preset. Default: the embedded model."),
    config: Optional[Path] = typer.Option(None, "--config", help="config.json for a bare weights file."),
) -> None:
    """Print a checkpoint's config, parameter counts and stored dtypes."""
    from aim_rt.checkpoint import open_checkpoint
    from aim_rt.loading import build

    with user_errors():
        ckpt = open_checkpoint(model or str(default_model_path()), config)
        loaded = build(ckpt)
    net, cfg = loaded.model, loaded.model.config
    table = Table(title=Text(f"AiM checkpoint {ckpt.source}"))
    table.add_column("field")
    table.add_column("value")
    for key, value in vars(cfg).items():
        table.add_row(key, str(value))
    for key in ("d_inner", "nheads", "conv_dim", "groups", "null_class"):
        table.add_row(key, str(getattr(cfg, key)))
    stage2 = sum(p.numel() for name, p in net.named_parameters() if not name.startswith("vq."))
    table.add_row("stage-2 parameters", f"{stage2:,} ({stage2 / 1e6:.2f}M)")
    if net.vq is not None:
        nvq = sum(p.numel() for p in net.vq.parameters())
        table.add_row("VQ parameters", f"{nvq:,} ({nvq / 1e6:.2f}M)")
        table.add_row("VQ config", str(net.vq.config))
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in [*ckpt.stage2.values(), *ckpt.vq.values()]})
    table.add_row("stored dtypes", ", ".join(dtypes))
    table.add_row("weights files", Text(", ".join(str(f) for f in ckpt.files)))
    if loaded.sampling_defaults:
        table.add_row("recommended sampling", str(loaded.sampling_defaults))
    Console().print(table)


def main() -> None:
    """The console script: usage errors (a bad flag value, an unknown option) as one line too, exit 2."""
    try:
        code = app(prog_name="aim-rt", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx else str(e), file=sys.stderr)
        sys.exit(2)
    except click_errors.ClickException as e:
        command = f" {e.ctx.command_path}" if getattr(e, "ctx", None) else ""
        console.print(Text.assemble(("error: ", "bold red"), e.format_message(),
                                    f" (see{command or ' aim-rt'} --help)"), soft_wrap=True)
        sys.exit(e.exit_code)
    except click_errors.Abort:
        sys.exit(1)
    sys.exit(code or 0)


if __name__ == "__main__":
    sys.exit(main())
