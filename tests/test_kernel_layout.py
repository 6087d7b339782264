"""The ctypes parameter structs and the C structs of aim_kernels.cu must agree field for field: the source that
NVRTC compiles carries static_asserts of the ctypes layout, so a one-sided edit fails to compile (here, in CI)."""

import ctypes

import pytest

from test_cuda_backend import _nvrtc_usable

pytestmark = pytest.mark.skipif(not _nvrtc_usable(), reason="cuda-python with an NVRTC library is not installed")


def _nvrtc_has_offsetof() -> bool:
    """NVRTC 13.0 (the GPU machine's) rejects __builtin_offsetof; the pip NVRTC that CI installs accepts it."""
    from cuda.bindings import nvrtc

    src = b"struct S { int a; double b; };\nstatic_assert(__builtin_offsetof(S, b) == 8, \"\");\n"
    err, prog = nvrtc.nvrtcCreateProgram(src, b"probe.cu", 0, [], [])
    ok = int(nvrtc.nvrtcCompileProgram(prog, 1, [b"--gpu-architecture=sm_80"])[0]) == 0
    nvrtc.nvrtcDestroyProgram(prog)
    return ok


needs_offsetof = pytest.mark.skipif(_nvrtc_usable() and not _nvrtc_has_offsetof(),
                                    reason="this NVRTC has no __builtin_offsetof (CI's pip NVRTC has)")


def test_layout_asserts_cover_every_field():
    from aim_rt.plugins import kernels

    text = kernels.layout_asserts()
    for struct in kernels.STRUCTS:
        assert f"sizeof({struct.__name__}) == {ctypes.sizeof(struct)}" in text
        for field, _ in struct._fields_:
            assert f"__builtin_offsetof({struct.__name__}, {field}) ==" in text


@needs_offsetof
def test_a_struct_edited_on_one_side_fails_to_compile(monkeypatch):
    from aim_rt.plugins import kernels

    fields = list(kernels.NormParams._fields_)
    fields.insert(3, ("extra", ctypes.c_int))  # a field the C struct does not have: every later offset moves
    drifted = type("NormParams", (ctypes.Structure,), {"_fields_": fields})
    monkeypatch.setattr(kernels, "STRUCTS", (kernels.SsuParams, kernels.GatedNormParams, drifted,
                                             kernels.SampleParams))
    with pytest.raises(kernels.KernelError, match="NormParams"):
        kernels.compile_cubin("bfloat16", "sm_90", use_cache=False, check_layout=True)


@needs_offsetof
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_structs_agree(dtype):
    from aim_rt.plugins import kernels

    assert kernels.compile_cubin(dtype, "sm_90", use_cache=False, check_layout=True)[:4] == b"\x7fELF"
