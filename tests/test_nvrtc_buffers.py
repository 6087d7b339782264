"""Compiling the kernels must leave the interpreter intact (issue 13: NVRTC once wrote a NUL into CPython's
shared one-byte bytes object for a space, and every later b" " in the process became b"\\x00")."""

import subprocess
import sys
import textwrap

import pytest

from test_cuda_backend import _nvrtc_usable


@pytest.mark.skipif(not _nvrtc_usable(), reason="cuda-python with an NVRTC library is not installed")
def test_compiling_leaves_one_byte_bytes_intact(tmp_path):
    # A fresh process with an empty kernel cache: the first compile is the one that corrupted.
    code = textwrap.dedent("""
        import io, numpy as np
        from aim_rt.plugins.kernels import compile_cubin
        for arch in ("sm_80", "sm_90"):
            assert compile_cubin("bfloat16", arch)[:4] == b"\\x7fELF"
        # compare byte values, not objects: a corrupted cached object equals itself under every spelling
        assert b" "[0] == bytes([32])[0] == " ".encode()[0] == 32, (b" ", bytes([32]))
        assert [bytes([i])[0] for i in range(256)] == list(range(256))
        buf = io.BytesIO()
        np.save(buf, np.arange(256, dtype=np.int64).reshape(1, 256))
        buf.seek(0)
        assert (np.load(buf) == np.arange(256)).all()
        print("intact")
    """)
    env = {**__import__("os").environ, "AIM_RT_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "intact" in r.stdout, r.stdout + r.stderr
