"""The GlobalAttention kernel's other callers and paths: its AVX512-BF16 dot products (CPUs without AMX),
the ISA cap that picks them, and the torch runtime's explanation capture through the kernel (ctypes,
``global_attention.LibraryAttention``): equal to segment_anything's arithmetic and to torch's own capture,
the runtime's choice, inconsistent inputs named, and the planted-attention geometry check; and the same
capture in torch ops (``TorchAttention``), what GPUs run."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from backend import openvino_ops
from backend.config import EngineConfig
from backend.encoder_runtime import TorchImageEncoder, build_encoder_runtime
from backend.global_attention import LibraryAttention, TorchAttention, reference
from backend.models import build_sam, cpu_flags
from backend.segmenter import SamSegmenter
from tests.test_global_attention import SHAPES, attention_inputs, expected, run

CPU = torch.device("cpu")
HAS_DOT = openvino_ops.DOT_BF16_FLAG in cpu_flags()
BF16_TOLERANCE = {"rtol": 3e-2, "atol": 3e-2}


@pytest.fixture(scope="module")
def kernel(ops_library) -> LibraryAttention:
    return LibraryAttention(ops_library.path)


@pytest.mark.parametrize("flags, cap, products", [
    ("avx512_bf16 amx_tile amx_bf16", None, "amx"),
    ("avx512_bf16", None, "dot"),
    ("avx2 avx512f", None, None),
    ("amx_tile amx_bf16", None, None),  # tiles without AVX512-BF16: the kernel's packing needs it
    ("avx512_bf16 amx_tile amx_bf16", "AVX512_CORE_BF16", "dot"),
    ("avx512_bf16 amx_tile amx_bf16", "avx512_core_amx", "amx"),
    ("avx512_bf16 amx_tile amx_bf16", "AVX512_CORE_VNNI", None),
    ("avx512_bf16 amx_tile amx_bf16", "ALL", "amx"),
    ("avx512_bf16", "AVX2", None),
])
def test_bf16_products_follow_the_cpu_and_onednns_isa_cap(monkeypatch, flags, cap, products):
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert openvino_ops.bf16_products(flags.split()) == products


@pytest.mark.skipif(not HAS_DOT, reason="the dot products need AVX512-BF16")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("matrix", [False, True], ids=["received", "matrix"])
def test_dot_products_equal_sams_arithmetic(ops_library, monkeypatch, shape, matrix):
    """The node on AVX512-BF16's dot products (the ISA cap below AMX picks them on any CPU that has them)."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    grid_h, grid_w, heads, width = shape
    inputs = attention_inputs(2, grid_h, grid_w, heads, width, seed=grid_h * 7 + grid_w)
    ours = run(ops_library, inputs, heads, matrix, bf16=True)
    theirs = expected(inputs, heads, matrix)
    torch.testing.assert_close(torch.from_numpy(ours[0]).double(), theirs[0], **BF16_TOLERANCE)
    for got, want in zip(ours[1:], theirs[1:], strict=True):
        torch.testing.assert_close(torch.from_numpy(got.astype(np.float64)), want.double(), rtol=3e-2, atol=1e-3)
    np.testing.assert_allclose(ours[1].sum(-1), 1.0, atol=1e-3)


@pytest.mark.parametrize("cap", ["ALL", "AVX512_CORE_BF16", "AVX512_CORE"], ids=["best", "dot", "f32"])
@pytest.mark.parametrize("matrix", [False, True], ids=["received", "matrix"])
def test_the_kernel_from_torch_equals_the_node(ops_library, kernel, monkeypatch, cap, matrix):
    """``LibraryAttention`` (ctypes) runs the node's arithmetic: the same numbers, whichever products the
    cap leaves (AMX, dot products or f32 where the CPU has them)."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    heads = 3
    inputs = attention_inputs(2, 6, 11, heads, 80, seed=5)
    ours = kernel(*inputs, heads, 80 ** -0.5, True, matrix)
    node = run(ops_library, inputs, heads, matrix, bf16=True)
    assert len(ours) == len(node) == (4 if matrix else 2)
    for index, (got, want) in enumerate(zip(ours, node, strict=True)):
        assert got.dtype == (torch.float16 if want.dtype == np.float16 else torch.float32)
        if index in (0, 3):  # per query, made by one task: bit for bit
            np.testing.assert_array_equal(got.numpy(), want)
        else:  # key sums: the threads' partial sums, added in another order
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-9)
    theirs = expected(inputs, heads, matrix)
    torch.testing.assert_close(ours[0].double(), theirs[0], **BF16_TOLERANCE)
    f32 = kernel(*inputs, heads, 80 ** -0.5, False, matrix)
    for got, want in zip(f32, theirs, strict=True):
        torch.testing.assert_close(got.double(), want.double(), rtol=5e-3 if got.dtype == torch.float16 else 1e-5,
                                   atol=1e-3 if got.dtype == torch.float16 else 2e-6)


@pytest.mark.parametrize("broken, message", [
    (lambda t: t.__setitem__(1, t[1][:, :-1]), "k must be \\(1, 16, 32\\)"),
    (lambda t: t.__setitem__(3, t[3][..., :-1]), "H \\* W = N = 16"),
    (lambda t: t.__setitem__(4, t[4][:, :1]), "rel_w must be \\(1, 2, 16, 4\\)"),
    (lambda t: t.__setitem__(5, t[5][:, :-1]), "query_weights must be \\(1, 16\\)"),
    (lambda t: t.__setitem__(0, t[0][..., :-1]), "q must be \\(B, N, heads \\* d\\) with heads=2"),
])
def test_the_kernel_from_torch_names_inconsistent_inputs(kernel, broken, message):
    inputs = attention_inputs(1, 4, 4, 2, 16, seed=1)
    broken(inputs)
    with pytest.raises(ValueError, match=message):
        kernel(*inputs, 2, 0.25, False, False)


@pytest.fixture(scope="module")
def config(tiny_cache, tmp_path_factory) -> EngineConfig:
    return EngineConfig.from_file(tiny_cache / "engine.json", runtime="torch",
                                  openvino_cache_dir=tmp_path_factory.mktemp("openvino_cache"))


@pytest.mark.parametrize("matrix", [False, True], ids=["received", "matrix"])
def test_torch_attention_equals_sams_arithmetic(matrix):
    """``TorchAttention`` (the GPU capture's kernel, torch ops on any device) against float64 arithmetic."""
    heads = 3
    inputs = attention_inputs(2, 5, 7, heads, 16, seed=11)
    ours = TorchAttention()(*inputs, heads, 0.25, False, matrix)
    theirs = reference(*(t.double() for t in inputs), heads, 0.25, matrix)
    assert [t.dtype for t in ours] == [torch.float32] * (3 if matrix else 2) + ([torch.float16] if matrix else [])
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got.double(), want.double(), rtol=5e-3 if got.dtype == torch.float16 else 1e-5,
                                   atol=1e-3 if got.dtype == torch.float16 else 2e-6)


def test_the_capture_runs_the_library_on_cpu_and_torch_ops_on_gpus(config, kernel):
    sam = build_sam(config)
    with_kernel, without = TorchImageEncoder(sam.image_encoder, kernel=kernel), TorchImageEncoder(sam.image_encoder)
    assert with_kernel.kernel_for(CPU) is kernel and without.kernel_for(CPU) is None
    for runtime in (with_kernel, without):
        assert isinstance(runtime.kernel_for(torch.device("cuda", 0)), TorchAttention)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("which", ["library", "torch-ops"])
def test_torch_capture_through_the_kernel_equals_torchs_own(config, kernel, chelsea, dtype, which):
    """The torch runtime with the kernel (the library's on CPU, or the torch-ops one GPUs run) keeps what the
    engine reads: the features, each global block's received map and the last block's matrix and column
    mean, as torch's own capture (f32: to float rounding)."""
    sam = build_sam(config)
    x, input_size = SamSegmenter(sam, CPU).preprocess(chelsea)
    theirs = TorchImageEncoder(sam.image_encoder, dtype).encode(x, input_size, capture=True)
    ours = TorchImageEncoder(sam.image_encoder, dtype, kernel if which == "library" else TorchAttention()
                             ).encode(x, input_size, capture=True)
    assert ours.attention is not None and theirs.attention is not None
    loose = dtype == torch.bfloat16
    np.testing.assert_allclose(ours.features.numpy(), theirs.features.numpy(), rtol=5e-2 if loose else 1e-4,
                               atol=5e-2 if loose else 1e-4)
    assert sorted(ours.attention.received) == sorted(theirs.attention.received)
    for block, want in theirs.attention.received.items():
        got = ours.attention.received[block]
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=5e-2 if loose else 1e-4, atol=1e-5 if loose else 1e-8)
        np.testing.assert_allclose(got.sum(), 1.0, atol=1e-3)
    mine, other = ours.attention.last_block, theirs.attention.last_block
    assert (mine.block_index, mine.num_heads, mine.grid) == (other.block_index, other.num_heads, other.grid)
    assert mine.matrix.dtype == np.float16 and mine.matrix.shape == other.matrix.shape
    np.testing.assert_allclose(mine.matrix.astype(np.float32), other.matrix.astype(np.float32),
                               rtol=5e-2 if loose else 2e-3, atol=1e-4 if loose else 1e-6)
    np.testing.assert_allclose(mine.received, other.received, rtol=5e-2 if loose else 1e-4, atol=1e-9)


def test_the_torch_runtime_uses_the_kernel_for_bf16_explanations_on_cpu(config, ops_library, monkeypatch):
    """bf16 on a CPU with bf16 products and explanations on: the kernel. fp32, explanations off, or a CPU
    whose products the cap takes away: torch's own capture."""
    import backend.models

    monkeypatch.setattr(backend.models, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)

    def runtime(dtype: torch.dtype, explanations: bool = True) -> TorchImageEncoder:
        encoder = build_sam(config).image_encoder
        built = build_encoder_runtime(config.replace(explanations=explanations), encoder, CPU, dtype)
        assert isinstance(built, TorchImageEncoder)
        return built

    assert isinstance(runtime(torch.bfloat16).kernel, LibraryAttention)
    assert runtime(torch.float32).kernel is None
    assert runtime(torch.bfloat16, explanations=False).kernel is None
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert runtime(torch.bfloat16).kernel is None


def test_without_the_library_the_torch_runtime_keeps_its_own_capture(config, monkeypatch, tmp_path, caplog):
    import backend.models

    monkeypatch.setattr(backend.models, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    monkeypatch.setattr(openvino_ops, "_loaded", {})
    with caplog.at_level(logging.WARNING):
        built = build_encoder_runtime(config.replace(openvino_cache_dir=tmp_path / "fresh"),
                                      build_sam(config).image_encoder, CPU, torch.bfloat16)
    assert isinstance(built, TorchImageEncoder) and built.kernel is None
    assert [r.getMessage() for r in caplog.records if "operations library is not available" in r.getMessage()]


def test_planted_attention_lands_on_the_right_token_through_the_torch_kernel(config, kernel):
    """tests/test_sam_attention.py's geometry check on the torch runtime with the kernel: an encoder made so
    every query of global block 1 attends to one token finds that token, padding excluded."""
    from tests.test_sam_attention import _planted_encoder

    r, c = 10, 42  # 500 x 333 photo -> 1024 x 682 input: column 42 is the last, partial token column
    encoder, image = _planted_encoder(build_sam(config), r, c)
    encoded = TorchImageEncoder(encoder, torch.float32, kernel).encode(image, (1024, 682), capture=True)
    received = encoded.attention.received[1]
    assert np.unravel_index(received.argmax(), received.shape) == (r, c)
    assert received[r, c] > 0.99
