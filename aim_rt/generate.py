"""Batch offline sampling to PNGs, tokens and an ADM-style samples.npz, resumable after an interrupt.

An image is named by its class and its index within that class (`0207_00003.png`); its seed derives from the
run's base seed, its class and that index, so any subset of a run can be (re)made independently. An image
counts as done when its token .npy and its PNG (written last, atomically) exist and verify; a rerun skips done
images and recomputes damaged ones.

An output directory holds one job: `job.json` records the whole plan (every image name, the seeds' hash, the
settings, backend, dtype, batch size, model hash) and what aim-rt writes there; a rerun that differs in any of
these is refused, and `--overwrite` removes only the files that record lists. A lock (joblock.py) keeps a
second writer out while a job runs.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .backends import Backend
from .distributed import Shard, fault_point
from .errors import OutputError, SamplingError, UsageError
from .joblock import JobLock
from .outputs import (atomic_save_npy, atomic_save_npz, atomic_save_png, atomic_write_json, make_grid,
                      png_file_problem, remove_stale_temps, token_file_problem)
from .sampling import SamplingSettings, image_seed
from .validation import check_artifacts_hash, check_batch_size, check_count, check_prefix, parse_class_spec
from .vq import to_uint8

JOB_FILE = "job.json"
JOB_FORMAT = "aim-rt-job/2"
FINAL_FILES = ("tokens.npz", "samples.npz", "grid.png")
_SHARD_FILE = re.compile(r"rank-\d+-of-\d+\.json")
_IMAGE_NAME = re.compile(r"\d{4,}_\d{5,}\.(png|npy)")  # what aim-rt names images and tokens


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
    parsed = parse_class_spec(spec, num_classes)
    return None if parsed.random else parsed.classes()


def plan_images(classes: list[int] | None, images_per_class: int, num_images: int, num_classes: int,
                base_seed: int) -> list[ImageSpec]:
    """Every image of a run in order: `images_per_class` of each listed class, or `num_images` random classes."""
    if classes is None:
        check_count(num_images, "num_images (--num-images)")
        drawn = np.random.default_rng(base_seed).integers(0, num_classes, size=num_images)
        classes, images_per_class = [int(c) for c in drawn], 1
    check_count(images_per_class, "images_per_class (-n)")
    if not classes:
        raise SamplingError("no classes given")
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
    tokens: np.ndarray | None
    images: np.ndarray | None
    written: list[Path] = field(default_factory=list)
    recomputed: list[str] = field(default_factory=list)  # finished files found damaged and made again


# ----- the job record -----------------------------------------------------------------------------
def job_record(plan: list[ImageSpec], settings: SamplingSettings, *, model_id: str, base_seed: int,
               batch_size: int, backend: str, dtype: str, prefix: np.ndarray | None) -> dict:
    """Everything that decides the bits of a run's images, and the files aim-rt writes for it."""
    seeds = np.array([s.seed for s in plan], dtype=np.int64)
    return {
        "format": JOB_FORMAT,
        "model": model_id,
        "backend": backend,
        "dtype": dtype,
        "settings": settings.to_dict(),
        "seed": base_seed,
        "batch_size": batch_size,  # batches are fixed slices of the plan; another size can change bits
        "prefix_sha256": None if prefix is None else hashlib.sha256(np.ascontiguousarray(prefix).tobytes()).hexdigest(),
        "plan": {"num_images": len(plan), "seeds_sha256": hashlib.sha256(seeds.tobytes()).hexdigest(),
                 "images": [s.name for s in plan]},
        "files": {"images": "images/NAME.png", "tokens": "tokens/NAME.npy", "final": list(FINAL_FILES),
                  "shards": "shards/rank-R-of-W.json"},
    }


_FLAGS = {"model": "the model weights (sha256)", "backend": "--backend", "dtype": "--dtype", "seed": "--seed",
          "batch_size": "--batch-size", "prefix_sha256": "--prefix", "plan": "the images planned (--classes, -n, "
          "--num-images)", "format": "the job record format (made by an older aim-rt)", "cfg_scale": "--cfg-scale",
          "top_k": "--top-k", "top_p": "--top-p", "temperature": "--temperature",
          "position_convention": "--position-convention"}


def record_differences(old: dict, new: dict) -> list[str]:
    """Each compared setting that differs, named by its flag, with both values (the plan by its size)."""
    diffs = []
    for key in ("format", "model", "backend", "dtype", "seed", "batch_size", "prefix_sha256", "settings", "plan"):
        was, now = old.get(key), new.get(key)
        if key == "settings" and isinstance(was, dict):
            diffs += [f"settings {_FLAGS.get(k, k)} (recorded {was.get(k)!r}, now {v!r})"
                      for k, v in now.items() if was.get(k) != v]
        elif key == "plan" and was != now:
            n_was = was.get("num_images") if isinstance(was, dict) else None
            diffs.append(f"{_FLAGS[key]} (recorded {n_was} images, now {now['num_images']}"
                         + (", other classes or seeds)" if n_was == now["num_images"] else ")"))
        elif was != now:
            diffs.append(f"{_FLAGS[key]} (recorded {was!r}, now {now!r})")
    return diffs


def read_record(out_dir: Path) -> dict | None:
    path = out_dir / JOB_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OutputError(f"{path} is unreadable ({e}); use another --out, or --overwrite to discard the job") from None
    if not isinstance(record, dict):
        raise OutputError(f"{path} is not an aim-rt job record; use another --out")
    return record


def _recorded_files(out_dir: Path, record: dict) -> list[Path]:
    """The files a job record says aim-rt wrote: its final files, each planned image and token file, the shard
    records. A record from an older aim-rt lists no plan: then its files are those with aim-rt's names."""
    files = [out_dir / name for name in FINAL_FILES]
    names = (record.get("plan") or {}).get("images") if isinstance(record.get("plan"), dict) else None
    for sub, ext in (("images", "png"), ("tokens", "npy")):
        if names is not None:
            files += [out_dir / sub / f"{n}.{ext}" for n in names]
        elif (out_dir / sub).is_dir():
            files += [p for p in (out_dir / sub).iterdir() if p.is_file() and _IMAGE_NAME.fullmatch(p.name)]
    if (out_dir / "shards").is_dir():
        files += [p for p in (out_dir / "shards").iterdir() if p.is_file() and _SHARD_FILE.fullmatch(p.name)]
    return files


def discard_job(out_dir: Path, record: dict) -> None:
    """--overwrite: remove what the old job wrote and nothing else. The final files go first, so that a kill at
    any point never leaves an old samples.npz beside a new job record."""
    for path in _recorded_files(out_dir, record):
        path.unlink(missing_ok=True)
    (out_dir / JOB_FILE).unlink()


def job_conflict(out_dir: Path, record: dict, overwrite: bool) -> str | None:
    """Why this job cannot use `out_dir` (None if it can); reads only. A recorded job is resumed only by the same
    job; files at this job's names that no record lists are never taken as done, nor deleted."""
    old = read_record(out_dir) if out_dir.is_dir() else None
    if old is not None and not overwrite:
        diff = record_differences(old, record)
        if diff:
            return (f"{out_dir} holds images of a different run (differs in: {'; '.join(diff)}); rerun with the "
                    "recorded settings to resume, pass another --out, or --overwrite to discard it")
        return None
    # With --overwrite the old job's files go; others at this job's names were written by no recorded job.
    if old is not None and not isinstance(old.get("plan"), dict):
        return None  # a record from an older aim-rt: every file at aim-rt's names is that job's, and goes
    ours = set(old["plan"].get("images") or []) if old is not None else set()
    clash = next((p for n in record["plan"]["images"] if n not in ours
                  for p in (out_dir / "images" / f"{n}.png", out_dir / "tokens" / f"{n}.npy") if p.exists()), None)
    if clash is not None:
        return (f"{clash} already exists but no aim-rt job record lists it; move it away or pass another --out "
                "(aim-rt never deletes files it did not write)")
    return None


def check_out_dir_for(out_dir: Path, record: dict, overwrite: bool) -> None:
    """Before any heavy work: the directory is free (no other job holds its lock) and can take this job."""
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        JobLock(out_dir).acquire().release()
    problem = job_conflict(out_dir, record, overwrite)
    if problem:
        raise OutputError(problem)


def prepare_out_dir(out_dir: Path, record: dict, overwrite: bool) -> None:
    """Make the directory this job's (the caller holds its lock): resume the same job, refuse another one."""
    for sub in ("", "images", "tokens"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    problem = job_conflict(out_dir, record, overwrite)
    if problem:
        raise OutputError(problem)
    old = read_record(out_dir)
    if old is not None and overwrite:
        discard_job(out_dir, old)
    atomic_write_json(out_dir / JOB_FILE, record)


def open_job(out_dir: Path, record: dict, overwrite: bool, lock: JobLock, shard: Shard) -> None:
    """Rank 0 (or the only process) takes the lock and prepares the directory; every rank learns the outcome, so
    that a refused job stops all ranks instead of leaving them waiting at a barrier."""
    failure: BaseException | None = None
    if shard.is_main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            prepare_out_dir(out_dir, record, overwrite)
        except Exception as e:  # re-raised below, after the other ranks were told
            failure = e
    verdict = shard.share(None if failure is None else str(failure) or type(failure).__name__)
    if failure is not None:
        raise failure
    if verdict is not None:
        raise OutputError(f"rank 0 could not open {out_dir}: {verdict}")


# ----- sampling -----------------------------------------------------------------------------------
def my_batches(num_images: int, batch_size: int, shard: Shard) -> list[list[int]]:
    """Batches are fixed slices of the plan, whatever is already done and however many ranks share the work:
    GEMM and convolution results can depend on the batch they ran in, so the same slices make the same bits.
    Ranks take whole batches round-robin."""
    batches = [list(range(b, min(b + batch_size, num_images))) for b in range(0, num_images, batch_size)]
    return [batch for k, batch in enumerate(batches) if k % shard.world == shard.rank]


def _paths(out_dir: Path, spec: ImageSpec) -> tuple[Path, Path]:
    return out_dir / "images" / f"{spec.name}.png", out_dir / "tokens" / f"{spec.name}.npy"


def remove_damaged(out_dir: Path, plan: list[ImageSpec], batches: list[list[int]], cfg) -> list[str]:
    """Finished images whose PNG or token file does not verify are removed (they are this job's files) so that
    they are made again; returns their names."""
    damaged = []
    for i in (i for batch in batches for i in batch):
        png, npy = _paths(out_dir, plan[i])
        if not png.exists():
            continue
        if not npy.exists() or token_file_problem(npy, cfg.num_tokens, cfg.vocab_size) or png_file_problem(png):
            png.unlink(missing_ok=True)
            npy.unlink(missing_ok=True)
            damaged.append(plan[i].name)
    return damaged


def sample_missing(backend: Backend, plan: list[ImageSpec], batches: list[list[int]], settings: SamplingSettings,
                   prefix: np.ndarray | None, out_dir: Path, progress: Callable[[int], None] | None,
                   shard: Shard) -> tuple[int, int]:
    """Run every batch with an image missing (whole, for the same bits), write the missing images; (made, skipped)."""
    def done(s: ImageSpec) -> bool:
        return all(p.exists() for p in _paths(out_dir, s))

    todo = [batch for batch in batches if not all(done(plan[i]) for i in batch)]
    made = sum(1 for batch in todo for i in batch if not done(plan[i]))
    skipped = sum(len(batch) for batch in batches) - made
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
            if done(plan[i]):
                continue
            png, npy = _paths(out_dir, plan[i])
            atomic_save_npy(npy, tokens[j].numpy().astype(np.int64))
            atomic_save_png(png, images[j])  # written last: marks the image done
            fresh += 1
        if progress:
            progress(fresh)
    return made, skipped


def write_shard_record(out_dir: Path, plan: list[ImageSpec], batches: list[list[int]], made: int, skipped: int,
                       shard: Shard) -> None:
    if shard.world == 1:
        return
    (out_dir / "shards").mkdir(exist_ok=True)
    atomic_write_json(out_dir / "shards" / f"rank-{shard.rank}-of-{shard.world}.json",
                      {"rank": shard.rank, "world": shard.world, "images": [plan[i].name for b in batches for i in b],
                       "made": made, "already_there": skipped})


# ----- assembling the final files -----------------------------------------------------------------
def _load_verified(out_dir: Path, plan: list[ImageSpec], cfg, with_images: bool):
    """Every token row (and image) of the plan, each verified; a damaged file is removed and named (the rerun
    makes it again), never assembled."""
    from PIL import Image

    missing = [s.name for s in plan if not all(p.exists() for p in _paths(out_dir, s))]
    if missing:
        raise OutputError(f"{len(missing)} images are missing (first: {missing[0]}): a rank did not finish; "
                          "rerun the same command to complete the run")
    tokens, images = [], []
    for s in plan:
        png, npy = _paths(out_dir, s)
        problem = token_file_problem(npy, cfg.num_tokens, cfg.vocab_size) or (
            png_file_problem(png, full=True) if with_images else None)
        if problem:
            png.unlink(missing_ok=True)
            npy.unlink(missing_ok=True)
            raise OutputError(f"{out_dir / 'images' / s.name}.png/.npy was damaged ({problem}) and was removed; rerun "
                              "the same command to make it again")
        tokens.append(np.load(npy))
        if with_images:
            with Image.open(png) as im:
                images.append(np.asarray(im.convert("RGB")))
    return np.stack(tokens), (np.stack(images) if with_images else None)


def assemble(out_dir: Path, plan: list[ImageSpec], cfg, npz: bool, grid: bool,
             grid_cols: int | None) -> tuple[np.ndarray, np.ndarray | None, list[Path]]:
    """tokens.npz, samples.npz and grid.png over the whole plan from disk (so a resumed run's equal an
    uninterrupted one's), written only once every image has been read and verified."""
    all_tokens, all_images = _load_verified(out_dir, plan, cfg, npz or grid)
    labels = np.array([s.cls for s in plan], dtype=np.int64)
    seeds = np.array([s.seed for s in plan], dtype=np.int64)
    written = [out_dir / "tokens.npz"]
    atomic_save_npz(written[0], tokens=all_tokens, classes=labels, seeds=seeds)
    if npz:
        written.append(out_dir / "samples.npz")
        atomic_save_npz(written[-1], arr_0=all_images, arr_1=labels)  # ADM layout: images, labels
    if grid:
        written.append(out_dir / "grid.png")
        atomic_save_png(written[-1], make_grid(all_images, grid_cols or _default_cols(plan)))
    return all_tokens, all_images, written


# ----- the backend ---------------------------------------------------------------------------------
def open_backend(name: str, model, *, model_sha256: str | None, source: str, dtype: str,
                 artifacts: Path | None = None) -> Backend:
    """The backend `name` over `model`. Backends that run exported artifacts get a directory whose manifest
    says it was exported from exactly these weights (exported here on first use for onnxruntime)."""
    from .backends import default_artifacts_dir, make_backend

    if name == "tensorrt" and artifacts is None:
        raise UsageError("--backend tensorrt needs --artifacts DIR (made by `aim-rt export MODEL --format trt "
                         "--out DIR`)")
    if name == "onnxruntime":
        cache = artifacts is None
        artifacts = Path(artifacts) if artifacts is not None else default_artifacts_dir(model_sha256, source, dtype)
        if not (artifacts / "manifest.json").exists():
            from aim_rt.exporters.onnx_export import export_onnx

            # Several torchrun ranks may arrive here at once: one exports, the others wait for it and reuse it.
            artifacts.mkdir(parents=True, exist_ok=True)
            with JobLock(artifacts, "--artifacts").acquire(wait=True):
                if not (artifacts / "manifest.json").exists():
                    export_onnx(model, artifacts, dtype=dtype, model_sha256=model_sha256, source=source,
                                overwrite=cache, lock=False)  # the cache is aim-rt's own: leftovers may go
    if artifacts is not None and (Path(artifacts) / "manifest.json").exists():
        from aim_rt.exporters.onnx_export import read_manifest

        check_artifacts_hash(read_manifest(artifacts), model_sha256, Path(artifacts), source)
    return make_backend(name, model, artifacts=artifacts, model_sha256=model_sha256, dtype=dtype)


# ----- the whole run ------------------------------------------------------------------------------
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

    Under torchrun each rank samples its share (`shard`); rank 0 holds the directory's lock, prepares it first
    and assembles once every rank is through. Each rank records what it was given in shards/rank-R-of-W.json.
    """
    shard = shard or Shard()
    cfg = backend.config
    if not plan:
        raise SamplingError("the plan holds no images")
    check_batch_size(batch_size)
    prefix = check_prefix(prefix, len(plan), cfg.num_tokens, cfg.vocab_size)
    out_dir = Path(out_dir)
    record = job_record(plan, settings, model_id=model_id, base_seed=base_seed, batch_size=batch_size,
                        backend=backend.name, dtype=dtype, prefix=prefix)
    lock = JobLock(out_dir)
    try:
        open_job(out_dir, record, overwrite, lock, shard)
        batches = my_batches(len(plan), batch_size, shard)
        damaged = remove_damaged(out_dir, plan, batches, cfg)
        made, skipped = sample_missing(backend, plan, batches, settings, prefix, out_dir, progress, shard)
        write_shard_record(out_dir, plan, batches, made, skipped, shard)
        shard.barrier()
        if not shard.is_main:
            return GenerateResult(out_dir, made, skipped, None, None, [], damaged)
        tokens, images, written = assemble(out_dir, plan, cfg, npz, grid, grid_cols)
        return GenerateResult(out_dir, made, skipped, tokens, images, written, damaged)
    finally:
        lock.release()


def _default_cols(plan: list[ImageSpec]) -> int:
    """One row per class when every class has the same count (≤ 16), else a near-square grid."""
    per: dict[int, int] = {}
    for s in plan:
        per[s.cls] = per.get(s.cls, 0) + 1
    counts = set(per.values())
    if len(counts) == 1 and 1 < (n := counts.pop()) <= 16:
        return n
    if len(plan) <= 16:
        return len(plan)
    return max(1, int(np.ceil(np.sqrt(len(plan)))))

