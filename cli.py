"""The `aim-rt` command line (installed as aim_rt.cli)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="aim-rt: fast, faithful sampling from AiM checkpoints.")
console = Console(stderr=True)


def default_model_path() -> Path:
    """The tiny digits AiM shipped inside the package (used when no model is named)."""
    import aim_rt

    return Path(aim_rt.__file__).resolve().parent / "data" / "digits"


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


@app.command()
def generate(
    model: Optional[str] = typer.Argument(None, help="Checkpoint directory or file, hub id (hp-l33/aim-base) or preset "
                                          "(AiM-B/L/XL). Default: the embedded digits model."),
    out: Path = typer.Option(Path("samples"), "--out", "-o", help="Output directory (resumable)."),
    classes: Optional[str] = typer.Option(None, "--classes", "-c", help="'3', '0,5,9', '0-9', 'all' or 'random'. "
                                          "Default: all classes if the model has at most 16, else random."),
    images_per_class: int = typer.Option(4, "--images-per-class", "-n", min=1),
    num_images: int = typer.Option(16, "--num-images", help="Number of images with --classes random.", min=1),
    batch_size: int = typer.Option(16, "--batch-size", "-b", min=1),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale", help="Classifier-free guidance scale (official 5)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep the k most likely tokens, 0 = all (official 600)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus mass in (0, 1], 1 = off (official 0.98)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="> 0; applied (the official code ignores it)."),
    position_convention: str = typer.Option("official", "--position-convention",
                                            help="'official': token k at position k+1; 'training': at k."),
    seed: int = typer.Option(0, "--seed", min=0, help="Base seed; each image's seed derives from it, its class and index."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    backend: str = typer.Option("torch", "--backend", help="torch (the reference), cuda (fused kernels + CUDA graphs), onnxruntime or tensorrt."),
    engines: Optional[Path] = typer.Option(None, "--engines", help="Export directory for the onnxruntime/tensorrt "
                                           "backends (ONNX made on first use; default: a cache keyed by the weights)."),
    npz: bool = typer.Option(True, "--npz/--no-npz", help="Write samples.npz (arr_0: N×H×W×3 uint8, arr_1: labels)."),
    grid: bool = typer.Option(True, "--grid/--no-grid", help="Write grid.png."),
    grid_cols: Optional[int] = typer.Option(None, "--grid-cols", min=1),
    prefix: Optional[Path] = typer.Option(None, "--prefix", help=".npy of given first tokens, (m,) or (N, m)."),
    config: Optional[Path] = typer.Option(None, "--config", help="config.json for a bare weights file."),
    vq: Optional[str] = typer.Option(None, "--vq", help="VQ tokenizer to decode with, when the checkpoint has none "
                                     "(e.g. LlamaGen's vq_ds16_c2i.pt)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard what --out holds instead of resuming."),
) -> None:
    """Sample images to PNGs, tokens.npz, samples.npz and grid.png; rerun the same command to resume."""
    import numpy as np

    from aim_rt import AiMError, SamplingSettings, load_model, load_vq
    from aim_rt.loading import attach_vq
    from aim_rt.backends import make_backend
    from aim_rt.generate import parse_classes, plan_images, run

    from aim_rt.distributed import from_environment

    done = 0
    shard = from_environment()
    quiet = not shard.is_main
    try:
        model_ref = model or str(default_model_path())
        if shard.world > 1 and device in ("auto", "cuda"):  # one GPU per rank under torchrun
            import torch

            if torch.cuda.is_available():
                device = f"cuda:{shard.local_rank % torch.cuda.device_count()}"
                torch.cuda.set_device(device)
        net = load_model(model_ref, device=device, dtype=dtype, config=config)
        if vq is not None:
            attach_vq(net, load_vq(vq))
        if net.vq is None:
            raise AiMError(f"{net.source} has no VQ tokenizer to decode images with; pass one with --vq PATH")
        cfg = net.config
        defaults = {**SamplingSettings().to_dict(), **net.sampling_defaults}
        chosen = {"cfg_scale": cfg_scale, "top_k": top_k, "top_p": top_p, "temperature": temperature}
        settings = SamplingSettings(**{k: (v if v is not None else defaults[k]) for k, v in chosen.items()},
                                    position_convention=position_convention)
        spec = classes if classes is not None else ("all" if cfg.num_classes <= 16 else "random")
        plan = plan_images(parse_classes(spec, cfg.num_classes), images_per_class, num_images, cfg.num_classes, seed)
        prefix_arr = np.load(prefix) if prefix is not None else None
        sha = net.checkpoint.sha256() if getattr(net, "checkpoint", None) is not None else None
        engine = make_backend(backend, net, artifacts=engines, model_sha256=sha, dtype=dtype)
        model_id = sha or net.source
        ranks = f" · {shard.world} ranks" if shard.world > 1 else ""
        if not quiet:
            console.print(f"model [bold]{net.source}[/] ({cfg.n_layer} layers, d={cfg.d_model}) · backend {backend} · "
                          f"{net.device} {dtype}{ranks} · {len(plan)} images → {out}")
        with Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console, disable=quiet) as bar:
            mine = sum(min(batch_size, len(plan) - b) for k, b in enumerate(range(0, len(plan), batch_size))
                       if k % shard.world == shard.rank)
            task = bar.add_task("sampling", total=mine)

            def advance(n: int) -> None:
                nonlocal done
                done += n
                bar.advance(task, n)

            result = run(engine, plan, settings, out, model_id=model_id, base_seed=seed, batch_size=batch_size,
                         dtype=dtype, prefix=prefix_arr, npz=npz, grid=grid, grid_cols=grid_cols,
                         overwrite=overwrite, progress=advance, shard=shard)
    except AiMError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: {done} finished images are kept in {out}; "
                      "rerun the same command to resume.")
        raise typer.Exit(130)
    if quiet:
        return
    note = f" ({result.skipped} already there)" if result.skipped else ""
    console.print(f"made {result.made} images{note} in {result.out_dir / 'images'}"
                  + (" on rank 0 (each rank wrote its own share)" if shard.world > 1 else ""))
    for path in result.written:
        console.print(f"wrote {path}")


@app.command()
def export(
    model: Optional[str] = typer.Argument(None, help="Checkpoint, hub id or preset. Default: the embedded model."),
    out: Path = typer.Option(..., "--out", "-o", help="Export directory."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (18-21)."),
    prefix_len: int = typer.Option(0, "--prefix-len", help="Prefill graph takes this many given first tokens."),
    vq_uint8: bool = typer.Option(False, "--vq-uint8", help="VQ graph outputs uint8 NHWC images."),
    fmt: str = typer.Option("onnx", "--format", help="onnx, or trt: also build TensorRT engines into OUT/engines."),
    batch_min: int = typer.Option(1, "--batch-min"),
    batch_opt: int = typer.Option(16, "--batch-opt"),
    batch_max: int = typer.Option(64, "--batch-max"),
    config: Optional[Path] = typer.Option(None, "--config", help="config.json for a bare weights file."),
) -> None:
    """Export the prefill/step graphs (custom-op and portable) and the VQ decoder to ONNX, with a manifest;
    with --format trt, build TensorRT engines from them too."""
    from aim_rt import AiMError, load_model

    try:
        from aim_rt.exporters.onnx_export import export_onnx
    except ImportError as e:
        _fail(f"exporting needs onnx: pip install 'aim-rt[onnx]' ({e})")
    try:
        net = load_model(model or str(default_model_path()), config=config)
        with console.status(f"exporting {net.source} ({dtype}, opset {opset})"):
            manifest = export_onnx(net, out, dtype=dtype, opset=opset, prefix_len=prefix_len, vq_uint8=vq_uint8,
                                   model_sha256=net.checkpoint.sha256() if net.checkpoint else None)
    except AiMError as e:
        _fail(str(e))
    for name, graph in manifest["graphs"].items():
        console.print(f"wrote {out / graph['file']}  ({name})")
    console.print(f"wrote {out / 'manifest.json'}")
    if fmt == "onnx":
        return
    if fmt != "trt":
        _fail(f"unknown --format {fmt!r}: use onnx or trt")
    from aim_rt.engines.builder import build_engines
    from aim_rt.engines.plan_meta import BatchRange

    try:
        results = build_engines(out, batch=BatchRange(batch_min, batch_opt, batch_max), log=console.print)
    except AiMError as e:
        _fail(str(e))
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
) -> None:
    """Time sampling (ms/step, autoregressive, VQ, end to end, images/s, peak memory, ratio to the floor)."""
    import json

    import torch

    from aim_rt.bench import run_bench

    if not torch.cuda.is_available():
        _fail("bench measures GPU backends and no CUDA GPU is visible to torch")
    table = Table(title="aim-rt bench")
    for col in ("model", "backend", "batch", "ms/step", "AR ms", "VQ ms", "e2e ms", "img/s", "peak GB", "floor ms/step",
                "x floor"):
        table.add_column(col)

    def show(row) -> None:
        console.print(f"{row.model} {row.backend} b={row.batch}: {row.end_to_end_ms:.1f} ms end to end")

    result = run_bench([m.strip() for m in models.split(",")], [int(b) for b in batches.split(",")],
                       [b.strip() for b in backends.split(",")], dtype, repeats, progress=show)
    for r in result["rows"]:
        table.add_row(r["model"], r["backend"] + (f" ({r['note']})" if r["note"] else ""), str(r["batch"]),
                      *(f"{r[k]:.3g}" for k in ("ms_per_step", "autoregressive_ms", "vq_ms", "end_to_end_ms",
                                                "images_per_s", "peak_memory_gb", "floor_ms_per_step",
                                                "ratio_to_floor")))
    Console().print(table)
    json_out.write_text(json.dumps(result, indent=1) + "\n")
    console.print(f"{result['device']}, copy bandwidth {result['copy_bandwidth_TBps']:.2f} TB/s; wrote {json_out}")


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
            table.add_row(key, "no" if value is False else "—" if value is None else str(value))
    for name, verdict in info["backends"].items():
        table.add_row(f"generate --backend {name}", verdict)
    Console().print(table)


@app.command()
def info(
    model: Optional[str] = typer.Argument(None, help="Checkpoint, hub id or preset. Default: the embedded model."),
    config: Optional[Path] = typer.Option(None, "--config", help="config.json for a bare weights file."),
) -> None:
    """Print a checkpoint's config, parameter counts and stored dtypes."""
    from aim_rt import AiMError
    from aim_rt.checkpoint import open_checkpoint
    from aim_rt.loading import load_model

    try:
        ref = model or str(default_model_path())
        ckpt = open_checkpoint(ref, config)
        net = load_model(ref, config=config)
    except AiMError as e:
        _fail(str(e))
    cfg = net.config
    table = Table(title=f"AiM checkpoint {ckpt.source}")
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
    table.add_row("weights files", ", ".join(str(f) for f in ckpt.files))
    if net.sampling_defaults:
        table.add_row("recommended sampling", str(net.sampling_defaults))
    Console().print(table)


def main() -> None:
    app(prog_name="aim-rt")


if __name__ == "__main__":
    sys.exit(main())
