"""The library readahead (aim_rt.readahead): finds torch's shared libraries without importing anything, runs in
a daemon thread, and is switched off by AIM_RT_READAHEAD=0."""

import importlib.util
from pathlib import Path

from aim_rt import readahead


def test_library_files_are_torchs_and_nvidias_shared_libraries():
    files = readahead.library_files()
    torch_lib = Path(importlib.util.find_spec("torch").submodule_search_locations[0]) / "lib"
    assert any(f.parent == torch_lib and f.name.startswith("libc10") for f in files)
    assert all(f.is_file() and ".so" in f.name for f in files)
    assert len(set(files)) == len(files)
    # torch's own first, then the CUDA libraries a run uses first (where the nvidia wheels are installed)
    first_other = next((i for i, f in enumerate(files) if f.parent != torch_lib), len(files))
    assert all(f.parent == torch_lib for f in files[:first_other])
    ranks = [readahead.library_rank(f) for f in files[first_other:]]
    assert ranks == sorted(ranks)


def test_start_runs_in_a_daemon_thread_and_can_be_switched_off(monkeypatch):
    monkeypatch.delenv("AIM_RT_READAHEAD", raising=False)
    thread = readahead.start()
    assert thread is not None and thread.daemon
    thread.join(timeout=60)
    assert not thread.is_alive()
    monkeypatch.setenv("AIM_RT_READAHEAD", "0")
    assert readahead.start() is None
