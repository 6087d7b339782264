"""Every check on what a user asks for, in one place: the CLI commands and the Python API call these before any
heavy work (no weights built, no file written). Each failure is an AiMError whose message names the flag or file
and says what to change. Checks of a sampling request's tensors live in sampling.check_request.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SamplingError, UsageError

# Longest single path component and whole path most file systems accept (Linux NAME_MAX / PATH_MAX).
_NAME_MAX, _PATH_MAX = 255, 4096
_ASCII_INT = re.compile(r"[0-9]+")
EXPORT_FORMATS = ("onnx", "trt")
DEVICE_HELP = "use auto, cpu, cuda or cuda:N"


# ----- paths --------------------------------------------------------------------------------------
def check_out_dir(path: Path | str, flag: str = "--out") -> Path:
    """An output directory that can be created and written: not '', not a file, not under a file, not too long,
    not read-only. Nothing is created here."""
    if str(path).strip() == "":
        raise UsageError(f"{flag} is empty; give a directory name (e.g. {flag} samples)")
    path = Path(path).expanduser()
    if len(str(path.absolute())) >= _PATH_MAX or any(len(part.encode()) > _NAME_MAX for part in path.parts):
        raise UsageError(f"{flag} path is too long for the file system ({len(str(path))} characters); use a shorter one")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a directory; pass a directory")
    ancestor = path.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {path} lies under {ancestor}, which is a file; pass a directory path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {ancestor} is not writable (read-only?); pass a directory you can write")
    return path


def check_artifacts_dir(path: Path | str | None, flag: str = "--artifacts") -> Path | None:
    """An export directory given to a backend must be a directory (it may not exist yet: it is made on first use)."""
    if path is None:
        return None
    if str(path).strip() == "":
        raise UsageError(f"{flag} is empty; give the directory `aim-rt export --out` made")
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file; pass the directory made by `aim-rt export MODEL --out DIR`")
    return path


def check_artifacts_hash(manifest: dict, model_sha256: str | None, directory: Path, model_ref: str) -> None:
    """Artifacts run instead of the loaded weights, so they must say they were exported from exactly those."""
    got = manifest.get("model_sha256")
    redo = f"re-export with `aim-rt export {model_ref} --out {directory} --overwrite`, or pass another --artifacts"
    if model_sha256 is None:
        return  # weights without files (random models): nothing to compare against
    if not got:
        raise UsageError(f"--artifacts {directory}: its manifest records no model hash, so it cannot be matched "
                         f"to these weights; {redo}")
    if got != model_sha256:
        raise UsageError(f"--artifacts {directory} was exported from other weights (sha256 {got[:12]}…, these are "
                         f"{model_sha256[:12]}…); {redo}")


# ----- classes and counts -------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassSpec:
    """Parsed --classes: inclusive ranges in the order given, or random (drawn per image)."""

    ranges: tuple[tuple[int, int], ...] | None  # None: random

    @property
    def random(self) -> bool:
        return self.ranges is None

    @property
    def count(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.ranges or ())

    def classes(self) -> list[int]:
        return [c for lo, hi in self.ranges or () for c in range(lo, hi + 1)]


def _class_number(text: str, spec: str) -> int:
    if not _ASCII_INT.fullmatch(text):  # int() also takes '٣', '+3', ' 3' and '3_0'
        raise SamplingError(f"cannot parse class list {spec!r} (--classes) at {text!r}: use ASCII digits, e.g. '3', '0,5,9', "
                            "'0-9', 'all' or 'random'")
    return int(text)


def parse_class_spec(spec: str, num_classes: int) -> ClassSpec:
    """'3', '0,5,9', '0-9', '0-9,17', 'all', 'random' → ranges, checked against the model without expanding them."""
    text = spec.strip().lower()
    if text == "random":
        return ClassSpec(None)
    if text == "all":
        return ClassSpec(((0, num_classes - 1),))
    ranges = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo_text, _, hi_text = part.partition("-")
        lo = _class_number(lo_text.strip(), spec)
        hi = _class_number(hi_text.strip(), spec) if "-" in part else lo
        if hi < lo:
            raise SamplingError(f"class range {part!r} in --classes is empty (write it low-high)")
        if hi >= num_classes:
            raise SamplingError(f"class {hi} is out of range: this model has classes 0..{num_classes - 1} (--classes)")
        ranges.append((lo, hi))
    if not ranges:
        raise SamplingError("no classes given in --classes")
    return ClassSpec(tuple(ranges))


def check_count(value, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SamplingError(f"{flag} must be an integer >= 1, got {value!r}")
    return value


def count_images(spec: ClassSpec, images_per_class: int | None, num_images: int | None) -> int:
    """-n goes with a class list, --num-images with random classes; mixing them is refused rather than ignored."""
    for value, flag in ((images_per_class, "--images-per-class/-n"), (num_images, "--num-images")):
        if value is not None:
            check_count(value, flag)
    if spec.random:
        if images_per_class is not None:
            raise UsageError("-n/--images-per-class counts images per listed class; with --classes random use "
                             "--num-images N")
        return num_images if num_images is not None else DEFAULT_NUM_IMAGES
    if num_images is not None:
        raise UsageError("--num-images goes with --classes random; with a class list use -n/--images-per-class")
    return spec.count * (images_per_class if images_per_class is not None else DEFAULT_IMAGES_PER_CLASS)


DEFAULT_IMAGES_PER_CLASS = 4
DEFAULT_NUM_IMAGES = 16


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SamplingError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    return batch_size


# ----- what a run needs ---------------------------------------------------------------------------
def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def run_needs(num_images: int, num_tokens: int, image_side: int, npz: bool, grid: bool) -> tuple[int, int]:
    """(memory, disk) bytes a run needs at most. Assembly holds every token row (and, for samples.npz or the grid,
    every image) in memory and serialises it once more; on disk each image is a PNG (at most its raw size) and a
    token .npy, plus tokens.npz and samples.npz. The plan itself is about 300 bytes per image."""
    raw = image_side * image_side * 3
    tokens = num_tokens * 8
    memory = num_images * (300 + 2 * tokens + (2 * raw if (npz or grid) else 0))
    disk = num_images * (raw + tokens + 128 + tokens + (raw if npz else 0))
    return memory, disk


def check_fits(num_images: int, num_tokens: int, image_side: int, out_dir: Path, npz: bool = True,
               grid: bool = True) -> None:
    """Refuse a run this machine cannot hold, saying how much it would need, before any work starts."""
    memory, disk = run_needs(num_images, num_tokens, image_side, npz, grid)
    available = _mem_available()
    if available is not None and memory > available:
        raise SamplingError(f"{num_images:,} images would need about {_gb(memory)} of memory to assemble, this "
                            f"machine has {_gb(available)} available; ask for fewer images (-n/--num-images/"
                            "--classes) or split the run over several --out directories")
    ancestor = Path(out_dir).absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    free = shutil.disk_usage(ancestor).free
    if disk > free:
        raise SamplingError(f"{num_images:,} images would need up to {_gb(disk)} of disk in {out_dir}, "
                            f"{_gb(free)} is free; free space, pick another --out, or ask for fewer images")


# ----- files the user hands in --------------------------------------------------------------------
def load_prefix(path: Path | str, flag: str = "--prefix") -> np.ndarray:
    """A .npy of integer tokens, (m,) or (N, m); anything else (floats, objects, text, .npz, missing) is refused."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file; pass a .npy of integer token ids, shape (m,) or (N, m)")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"{flag} {path} is not a readable .npy without pickled objects ({e}); save the tokens "
                         "with np.save(path, tokens.astype(np.int64))") from None
    if isinstance(arr, np.lib.npyio.NpzFile):
        arr.close()
        raise UsageError(f"{flag} {path} is an .npz archive; pass one .npy array of token ids")
    if arr.dtype.kind not in "iu":
        raise UsageError(f"{flag} {path} holds {arr.dtype} values; token ids must be integers (np.int64)")
    if arr.ndim not in (1, 2):
        raise UsageError(f"{flag} {path} has shape {arr.shape}; use (m,) for every image or (N, m) per image")
    return arr.astype(np.int64)


def check_prefix(prefix: np.ndarray | None, num_images: int, num_tokens: int, vocab_size: int) -> np.ndarray | None:
    """(m,) → broadcast to every image; (N, m) must have one row per planned image; ids within the vocabulary."""
    if prefix is None:
        return None
    prefix = np.asarray(prefix)
    if prefix.dtype.kind not in "iu":
        raise SamplingError(f"prefix must hold integer token ids, got {prefix.dtype}")
    prefix = prefix.astype(np.int64)
    if prefix.ndim == 1:
        prefix = np.broadcast_to(prefix, (num_images, prefix.shape[0]))
    if prefix.ndim != 2 or prefix.shape[0] != num_images or prefix.shape[1] >= num_tokens:
        raise SamplingError(f"prefix must be (m,) or ({num_images}, m) with m < {num_tokens}, got {prefix.shape}")
    if ((prefix < 0) | (prefix >= vocab_size)).any():
        raise SamplingError(f"prefix tokens must lie in [0, {vocab_size})")
    return prefix


# ----- export -------------------------------------------------------------------------------------
def check_export_request(fmt: str, batch_min: int, batch_opt: int, batch_max: int, opset: int, opsets: range) -> None:
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"unknown --format {fmt!r}: use onnx, or trt (ONNX then TensorRT engines)")
    if opset not in opsets:
        raise UsageError(f"--opset {opset} is not supported: aim-rt exports opsets {opsets.start}..{opsets.stop - 1}")
    if fmt == "trt" and not 1 <= batch_min <= batch_opt <= batch_max:
        raise UsageError(f"batch range must satisfy 1 <= --batch-min <= --batch-opt <= --batch-max, got "
                         f"{batch_min} / {batch_opt} / {batch_max}")


# ----- errors from the operating system, as one line ----------------------------------------------
def describe_os_error(e: OSError, out_dir: Path | None = None) -> str:
    where = f" {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC:
        kept = f"; finished images are kept in {out_dir}" if out_dir else ""
        return f"no space left on device while writing{where}{kept}; free space and rerun the same command to resume"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied writing{where} ({e.strerror}); pass a directory you can write"
    if e.errno == errno.ENAMETOOLONG:
        return f"file name too long:{where}; use a shorter path"
    return f"{e.strerror or e}{':' + where if where else ''}"


__all__ = ["ClassSpec", "check_out_dir", "check_artifacts_dir", "check_artifacts_hash", "parse_class_spec",
           "count_images", "check_batch_size", "run_needs", "check_fits", "load_prefix", "check_prefix",
           "check_export_request", "describe_os_error", "check_count"]
