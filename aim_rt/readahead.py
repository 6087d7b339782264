"""Ask the OS to read the GPU libraries into the page cache while the process does other things.

On a machine whose page cache does not hold them yet (after a reboot, a fresh container), a new process spends
seconds faulting torch's and the CUDA libraries' pages in from disk one small random read at a time: importing
torch, creating the CUDA context, the first cuBLAS and cuDNN calls. `start()` hands the kernel the whole list at
once (posix_fadvise WILLNEED: asynchronous readahead, large sequential reads) before torch is imported, so those
faults later find the pages in memory. Nothing is loaded or executed; with the files already cached it costs a
few milliseconds. AIM_RT_READAHEAD=0 turns it off (to measure what it gains: scripts/cold_start.py).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

# Read first: what every GPU run touches (torch's own libraries, then the CUDA libraries in the order a
# sampling run first uses them); the rest of the nvidia wheels after that.
_FIRST = ("libcudart", "libcublas", "libnvrtc", "libnvjitlink", "libcudnn")


def library_files() -> list[Path]:
    """The shared libraries of the installed torch and nvidia-* wheels, in the order to read them (found
    without importing torch)."""
    def roots(name):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return []
        return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []

    files = [f for r in roots("torch") for f in sorted((r / "lib").glob("*.so*"))]
    nvidia = [f for r in roots("nvidia") for f in sorted(r.rglob("*.so*")) if f.is_file()]

    return files + sorted(nvidia, key=library_rank)


def library_rank(f: Path) -> int:
    """Reading order among the nvidia wheels' libraries: _FIRST's, then the rest."""
    return next((i for i, key in enumerate(_FIRST) if f.name.lower().startswith(key)), len(_FIRST))


def _advise() -> None:
    for f in library_files():
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def start() -> threading.Thread | None:
    """Start the readahead in a daemon thread (fadvise can block while it queues the reads) and return it;
    None where it is turned off or the platform has no posix_fadvise."""
    if os.environ.get("AIM_RT_READAHEAD", "1") == "0" or not hasattr(os, "posix_fadvise"):
        return None
    thread = threading.Thread(target=_advise, name="aim-rt-readahead", daemon=True)
    thread.start()
    return thread
