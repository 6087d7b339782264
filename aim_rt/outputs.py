"""Writing results so that nothing is ever half written: temp file in the same directory, then rename."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import WriteError

TMP_MARK = ".tmp-"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # a half-written temp is garbage; the previous file (if any) is intact
        from .validation import describe_os_error

        e.filename = e.filename or str(path)
        raise WriteError(describe_os_error(e), e) from None


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_png(path: Path, image: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def remove_stale_temps(directory: Path) -> int:
    """Temp files left by a killed run are garbage: the rename never happened."""
    removed = 0
    if directory.is_dir():
        for p in directory.rglob(f"*{TMP_MARK}*"):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def token_file_problem(path: Path, num_tokens: int, vocab_size: int) -> str | None:
    """Why a finished token file cannot be used (None if it can): unreadable, wrong shape/dtype, out of vocabulary."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        return f"unreadable ({type(e).__name__})"
    if not isinstance(arr, np.ndarray) or arr.shape != (num_tokens,) or arr.dtype.kind not in "iu":
        return f"holds {getattr(arr, 'dtype', '?')} {getattr(arr, 'shape', '?')}, not {num_tokens} token ids"
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        return f"holds token ids outside [0, {vocab_size})"
    return None


def png_file_problem(path: Path, full: bool = False) -> str | None:
    """Why a finished PNG cannot be used: verify() checks its structure and CRCs; `full` decodes every pixel."""
    try:
        with Image.open(path) as im:
            if full:
                im.load()
            else:
                im.verify()
    except (OSError, SyntaxError, ValueError) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def make_grid(images: np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 → one image, `cols` per row, separated by `pad` white pixels."""
    n, h, w, c = images.shape
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return grid
