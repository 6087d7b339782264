"""Optimisation-profile shapes and the metadata written beside every plan, and the check made on loading one.

Pure Python: tested without TensorRT.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from aim_rt.errors import AiMError

META_SUFFIX = ".meta.json"


@dataclass(frozen=True)
class BatchRange:
    min: int = 1
    opt: int = 16
    max: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise AiMError(f"batch range must satisfy 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


def profile_shapes(inputs: list[dict], batch: BatchRange) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shapes per dynamic input from the export manifest's descriptions, where the symbolic
    dims are 'batch' (images) and 'rows' (2 x images: conditional + null rows). Static inputs are left out."""
    out = {}
    for spec in inputs:
        dims = spec["shape"]
        if all(isinstance(d, int) for d in dims):
            continue

        def at(b: int) -> tuple:
            resolved = []
            for d in dims:
                if d == "batch":
                    resolved.append(b)
                elif d == "rows":
                    resolved.append(2 * b)
                elif isinstance(d, int):
                    resolved.append(d)
                else:
                    raise AiMError(f"input {spec['name']!r} has an unknown symbolic dimension {d!r}")
            return tuple(resolved)

        out[spec["name"]] = (at(batch.min), at(batch.opt), at(batch.max))
    return out


@dataclass(frozen=True)
class PlanMeta:
    graph: str                 # e.g. "portable/step"
    onnx_file: str
    tensorrt_flavour: str      # "tensorrt" or "tensorrt-rtx"
    tensorrt_version: str
    gpu_name: str
    compute_capability: str    # "8.0"
    precision: str             # the export dtype; TensorRT may still pick per-layer precisions
    batch: dict
    model_sha256: str | None
    export_manifest: dict
    aim_rt_version: str

    def write(self, plan_path: Path) -> Path:
        path = Path(str(plan_path) + META_SUFFIX)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def read(cls, plan_path: Path) -> "PlanMeta":
        path = Path(str(plan_path) + META_SUFFIX)
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except FileNotFoundError:
            raise AiMError(f"{plan_path} has no {path.name} beside it: rebuild it with `aim-rt export --format trt`") from None
        except (TypeError, ValueError) as e:
            raise AiMError(f"{path} is unreadable ({e}): rebuild the engines with `aim-rt export --format trt`") from None


def check_plan(meta: PlanMeta, *, flavour: str, version: str, gpu_name: str, compute_capability: str,
               rebuild: str) -> None:
    """A plan runs only with the TensorRT that built it on the same kind of GPU: refuse early, say how to fix."""
    problems = []
    if meta.tensorrt_flavour != flavour or meta.tensorrt_version != version:
        problems.append(f"built with {meta.tensorrt_flavour} {meta.tensorrt_version}, this machine has {flavour} {version}")
    if meta.compute_capability != compute_capability:
        problems.append(f"built for compute capability {meta.compute_capability} ({meta.gpu_name}), "
                        f"this GPU is {compute_capability} ({gpu_name})")
    if problems:
        raise AiMError(f"engine {meta.graph} cannot run here: {'; '.join(problems)}. Rebuild: {rebuild}")
