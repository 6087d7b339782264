"""Batch offline sampling to PNGs, tokens and an ADM-style samples.npz, resumable after an interrupt.

An image is named by its class and its index within that class (`0207_00003.png`); its seed derives from the
run's base seed, its class and that index, so any subset of a run can be (re)made independently. An image
counts as done when its PNG exists (written last, atomically, after its tokens); a rerun skips done images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .backends import Backend
from .distributed import Shard, fault_point
from .errors import OutputError, SamplingError
from .outputs import (atomic_save_npy, atomic_save_npz, atomic_save_png, atomic_write_json, make_grid,
                      remove_stale_temps)
from .sampling import SamplingSettings, image_seed
from .vq import to_uint8

JOB_FILE = "job.json"


@dataclass
class ImageSpec:
    cls: int
    index: int  # index among the images of this class in this run
    seed: int

    @property
    def name(self) -> str:
        return f"{self.cls:04d}_{self.index:05d}"


def parse_classes(spec: str, num_classes: int) -> list[int] | None:
    """'3', '0,5,9', '0-9', '0-9,17', 'all' → class list; 'random' → None (drawn per image)."""
    spec = spec.strip().lower()
    if spec == "random":
        return None
    if spec == "all":
        return list(range(num_classes))
    out: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise SamplingError(f"class range {part!r} is empty")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise SamplingError(f"cannot parse class list {spec!r}: use e.g. '3', '0,5,9', '0-9', 'all' or 'random'") from None
    if not out:
        raise SamplingError("no classes given")
    for c in out:
        if not 0 <= c < num_classes:
            raise SamplingError(f"class {c} is out of range: this model has classes 0..{num_classes - 1}")
    return out


def plan_images(classes: list[int] | None, images_per_class: int, num_images: int, num_classes: int,
                base_seed: int) -> list[ImageSpec]:
    if images_per_class < 1:
        raise SamplingError(f"images per class must be >= 1, got {images_per_class}")
    if classes is None:
        if num_images < 1:
            raise SamplingError(f"--num-images must be >= 1 with random classes, got {num_images}")
        drawn = np.random.default_rng(base_seed).integers(0, num_classes, size=num_images)
        classes, images_per_class = [int(c) for c in drawn], 1
    counts: dict[int, int] = {}
    plan = []
    for c in classes:
        for _ in range(images_per_class):
            i = counts.get(c, 0)
            counts[c] = i + 1
            plan.append(ImageSpec(c, i, image_seed(base_seed, c, i)))
    return plan


@dataclass
class GenerateResult:
    out_dir: Path
    made: int
    skipped: int
    tokens: np.ndarray
    images: np.ndarray | None
    written: list[Path] = field(default_factory=list)


def _job_record(model_id: str, settings: SamplingSettings, base_seed: int, backend: str, dtype: str,
                prefix: np.ndarray | None) -> dict:
    return {
        "model": model_id,
        "settings": settings.to_dict(),
        "seed": base_seed,
        "prefix_sha256": None if prefix is None else hashlib.sha256(prefix.astype(np.int64).tobytes()).hexdigest(),
        # recorded, not compared: another backend/dtype may legitimately resume a run
        "backend": backend,
        "dtype": dtype,
    }


_COMPARED = ("model", "settings", "seed", "prefix_sha256")


def prepare_out_dir(out_dir: Path, record: dict, overwrite: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    (out_dir / "tokens").mkdir(exist_ok=True)
    remove_stale_temps(out_dir)
    job = out_dir / JOB_FILE
    if job.exists() and not overwrite:
        try:
            old = json.loads(job.read_text())
        except (OSError, ValueError) as e:
            raise OutputError(f"{job} is unreadable ({e}); use --overwrite or another --out") from None
        diff = [k for k in _COMPARED if old.get(k) != record[k]]
        if diff:
            raise OutputError(
                f"{out_dir} holds images of a different run (differs in: {', '.join(diff)}); "
                f"use another --out, or --overwrite to discard them")
    elif overwrite:
        for sub in ("images", "tokens"):
            for p in (out_dir / sub).iterdir():
                p.unlink()
    atomic_write_json(job, record)


def run(
    backend: Backend,
    plan: list[ImageSpec],
    settings: SamplingSettings,
    out_dir: Path,
    *,
    model_id: str,
    base_seed: int,
    batch_size: int = 16,
    dtype: str = "float32",
    prefix: np.ndarray | None = None,
    npz: bool = True,
    grid: bool = True,
    grid_cols: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    shard: Shard | None = None,
) -> GenerateResult:
    """Sample every planned image not already on disk, then assemble tokens/npz/grid over the whole plan.

    Under torchrun each rank samples its share (`shard`); the main rank prepares the directory first and
    assembles once every rank is through. Each rank records what it was given in shards/rank-R-of-W.json.
    """
    shard = shard or Shard()
    if batch_size < 1:
        raise SamplingError(f"batch size must be >= 1, got {batch_size}")
    cfg = backend.config
    if prefix is not None:
        prefix = np.asarray(prefix, dtype=np.int64)
        if prefix.ndim == 1:
            prefix = np.broadcast_to(prefix, (len(plan), prefix.shape[0]))
        if prefix.ndim != 2 or prefix.shape[0] != len(plan) or prefix.shape[1] >= cfg.num_tokens:
            raise SamplingError(f"prefix must be (m,) or ({len(plan)}, m) with m < {cfg.num_tokens}, got {prefix.shape}")
        if ((prefix < 0) | (prefix >= cfg.vocab_size)).any():
            raise SamplingError(f"prefix tokens must lie in [0, {cfg.vocab_size})")
    out_dir = Path(out_dir)
    if shard.is_main:
        prepare_out_dir(out_dir, _job_record(model_id, settings, base_seed, backend.name, dtype, prefix), overwrite)
    shard.barrier()
    img_dir, tok_dir = out_dir / "images", out_dir / "tokens"

    def done(s: ImageSpec) -> bool:
        return (img_dir / f"{s.name}.png").exists() and (tok_dir / f"{s.name}.npy").exists()

    # Batches are fixed slices of the plan, whatever is already done and however many ranks share the work:
    # GEMM and convolution results can depend on the batch they ran in, so the same slices make the same
    # bits. Ranks take whole batches round-robin; a batch with any image missing is run whole.
    batches = [list(range(b, min(b + batch_size, len(plan)))) for b in range(0, len(plan), batch_size)]
    mine = [batch for k, batch in enumerate(batches) if k % shard.world == shard.rank]
    todo = [batch for batch in mine if not all(done(plan[i]) for i in batch)]
    made = sum(1 for batch in todo for i in batch if not done(plan[i]))
    skipped = sum(len(batch) for batch in mine) - made
    if progress and skipped:
        progress(skipped)
    for batch_no, idx in enumerate(todo):
        fault_point(shard, batch_no)
        classes = torch.tensor([plan[i].cls for i in idx])
        seeds = torch.tensor([plan[i].seed for i in idx])
        pre = None if prefix is None else torch.from_numpy(np.ascontiguousarray(prefix[idx]))
        tokens = backend.sample(classes, seeds, settings, pre)
        images = to_uint8(backend.decode(tokens)).numpy()
        fresh = 0
        for j, i in enumerate(idx):
            name = plan[i].name
            if done(plan[i]):
                continue
            atomic_save_npy(tok_dir / f"{name}.npy", tokens[j].numpy().astype(np.int64))
            atomic_save_png(img_dir / f"{name}.png", images[j])  # written last: marks the image done
            fresh += 1
        if progress:
            progress(fresh)
    if shard.world > 1:
        (out_dir / "shards").mkdir(exist_ok=True)
        atomic_write_json(out_dir / "shards" / f"rank-{shard.rank}-of-{shard.world}.json",
                          {"rank": shard.rank, "world": shard.world,
                           "images": [plan[i].name for batch in mine for i in batch],
                           "made": made, "already_there": skipped})
    shard.barrier()
    if not shard.is_main:
        return GenerateResult(out_dir, made, skipped, None, None, [])
    missing = [s.name for s in plan if not done(s)]
    if missing:
        raise OutputError(f"{len(missing)} images are missing (first: {missing[0]}): a rank did not finish; "
                          "rerun the same command to complete the run")

    # Assemble over the whole plan from disk, so a resumed run's outputs equal an uninterrupted one's.
    all_tokens = np.stack([np.load(tok_dir / f"{s.name}.npy") for s in plan])
    all_images = None
    written = []
    if npz or grid:
        from PIL import Image

        all_images = np.stack([np.asarray(Image.open(img_dir / f"{s.name}.png").convert("RGB")) for s in plan])
    labels = np.array([s.cls for s in plan], dtype=np.int64)
    seeds_arr = np.array([s.seed for s in plan], dtype=np.int64)
    atomic_save_npz(out_dir / "tokens.npz", tokens=all_tokens, classes=labels, seeds=seeds_arr)
    written.append(out_dir / "tokens.npz")
    if npz:
        atomic_save_npz(out_dir / "samples.npz", arr_0=all_images, arr_1=labels)  # ADM layout: images, labels
        written.append(out_dir / "samples.npz")
    if grid:
        cols = grid_cols or _default_cols(plan)
        atomic_save_png(out_dir / "grid.png", make_grid(all_images, cols))
        written.append(out_dir / "grid.png")
    return GenerateResult(out_dir, made, skipped, all_tokens, all_images, written)


def _default_cols(plan: list[ImageSpec]) -> int:
    """One row per class when every class has the same count (≤ 16), else a near-square grid."""
    per = {}
    for s in plan:
        per[s.cls] = per.get(s.cls, 0) + 1
    counts = set(per.values())
    if len(counts) == 1 and 1 < (n := counts.pop()) <= 16:
        return n
    if len(plan) <= 16:
        return len(plan)
    return max(1, int(np.ceil(np.sqrt(len(plan)))))
