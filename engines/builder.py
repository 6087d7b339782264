"""Build TensorRT engines (plans) from an aim-rt ONNX export: prefill, step and VQ decoder.

Each plan gets an optimisation profile over a batch range, the export's precision, a shared timing cache and
a NAME.plan.meta.json (TensorRT version, GPU, compute capability, model hash, export manifest).
Custom-op graphs are built with their ONNX function bodies removed, so that TensorRT uses the aim_rt plugin
(plugins/trt_plugin.py) for SelectiveStateUpdate and CfgMix; without the plugin they fail to parse, and the
portable graphs remain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from aim_rt import __version__
from aim_rt.errors import AiMError

from .plan_meta import BatchRange, PlanMeta, profile_shapes
from .trt import require_tensorrt

DEFAULT_GRAPHS = ("portable/prefill", "portable/step", "vq_decoder", "custom/prefill", "custom/step")


@dataclass
class BuildResult:
    graph: str
    ok: bool
    seconds: float
    plan: str | None = None
    errors: list[str] = field(default_factory=list)


def gpu_identity() -> tuple[str, str]:
    import torch

    if not torch.cuda.is_available():
        raise AiMError("building TensorRT engines needs a CUDA GPU visible to torch")
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def _without_functions(src: Path) -> Path:
    """A copy of a custom-op graph without its function definitions (weights stay external, beside `src`)."""
    model = onnx.load(str(src), load_external_data=False)
    del model.functions[:]
    out = src.parent / f".{src.stem}.plugin.onnx"
    onnx.save_model(model, str(out))
    return out


def build_engines(export_dir: str | Path, out_dir: str | Path | None = None, *, batch: BatchRange = BatchRange(),
                  graphs=DEFAULT_GRAPHS, workspace_gib: float = 8.0, log=print) -> list[BuildResult]:
    from aim_rt.exporters.onnx_export import read_manifest

    trt_info = require_tensorrt()
    trt = trt_info.module
    export_dir = Path(export_dir)
    out = Path(out_dir or export_dir / "engines")
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(export_dir)
    gpu_name, cc = gpu_identity()
    if trt_info.flavour == "tensorrt":
        try:  # registers aim_rt::SelectiveStateUpdate / CfgMix when tensorrt.plugin exists (TensorRT >= 10.7)
            from aim_rt.plugins.trt_plugin import register

            register()
        except ImportError as e:
            log(f"aim_rt plugin not registered ({e}); custom-op graphs will not parse")
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = out / "timing.cache"
    results = []
    for name in graphs:
        if name not in manifest["graphs"]:
            continue
        t0 = time.time()
        spec = manifest["graphs"][name]
        onnx_path = export_dir / spec["file"]
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        path = _without_functions(onnx_path) if name.startswith("custom/") else onnx_path
        try:
            ok = parser.parse_from_file(str(path))
        finally:
            if path != onnx_path:
                path.unlink(missing_ok=True)
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        if not ok:
            results.append(BuildResult(name, False, time.time() - t0, errors=errors or ["parse failed"]))
            log(f"{name}: parse failed: {errors[:3]}")
            continue
        config = builder.create_builder_config()
        target_cc = cc
        if trt_info.flavour == "tensorrt-rtx" and hasattr(config, "set_compute_capability"):
            # TensorRT-RTX builds for named targets; A100 (8.0) is what our users run
            config.num_compute_capabilities = 1
            config.set_compute_capability(trt.ComputeCapability.SM80, 0)
            target_cc = "8.0"
        if hasattr(trt, "MemoryPoolType"):
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        flag = {"float16": "FP16", "bfloat16": "BF16"}.get(manifest["dtype"])
        if flag and hasattr(trt, "BuilderFlag") and hasattr(trt.BuilderFlag, flag):
            config.set_flag(getattr(trt.BuilderFlag, flag))
        shapes = profile_shapes(spec["inputs"], batch)
        if shapes:
            profile = builder.create_optimization_profile()
            for tensor, (lo, opt, hi) in shapes.items():
                profile.set_shape(tensor, lo, opt, hi)
            config.add_optimization_profile(profile)
        if hasattr(config, "create_timing_cache"):
            cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
            config.set_timing_cache(cache, False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            results.append(BuildResult(name, False, time.time() - t0, errors=["build_serialized_network returned None"]))
            log(f"{name}: build failed")
            continue
        plan_path = out / (name.replace("/", "_") + ".plan")
        plan_path.write_bytes(bytes(plan))
        PlanMeta(graph=name, onnx_file=spec["file"], tensorrt_flavour=trt_info.flavour,
                 tensorrt_version=trt_info.version, gpu_name=gpu_name, compute_capability=target_cc,
                 precision=manifest["dtype"], batch=vars(batch), model_sha256=manifest.get("model_sha256"),
                 export_manifest={k: manifest[k] for k in ("format", "config", "opset", "dtype", "prefix_len")},
                 aim_rt_version=__version__).write(plan_path)
        if hasattr(config, "get_timing_cache") and config.get_timing_cache() is not None:
            cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        results.append(BuildResult(name, True, time.time() - t0, plan=str(plan_path)))
        log(f"{name}: built {plan_path.name} ({plan_path.stat().st_size / 2**20:.1f} MiB) in {time.time() - t0:.1f} s")
    return results
