"""SAM's global-block attention as the operations library's node (backend/csrc/global_attention.cpp,
backend/global_attention.py): its kernel equals segment_anything's arithmetic in float64 (the f32 path
to float rounding, the bf16 path within bf16's), with padding sizes, head widths that are not a tile's
and zero query weights; it names inconsistent inputs; the capture graph with it equals the torch capture;
and the encoder runtime picks it for bf16 graphs on CPUs with bf16 products (AMX or AVX512-BF16) only.
The dot-product path and the torch runtime's use: tests/test_global_attention_torch.py."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from backend import openvino_ops
from backend.config import EngineConfig
from backend.encoder_graph import CapturingEncoder, global_block_indices
from backend.encoder_runtime import TorchImageEncoder
from backend.global_attention import reference
from backend.models import build_sam, cpu_flags
from backend.openvino_encoder import OpenVinoImageEncoder
from backend.sam_attention import use_fast_attention
from backend.segmenter import SamSegmenter

ov = pytest.importorskip("openvino")
CPU = torch.device("cpu")

# (grid H, grid W, heads, head width): a full tile row of keys, a grid and queries that are no multiple of
# the kernel's 32-query blocks, a head width past two tile depths (vit_h's 80), one of a half tile.
SHAPES = [(8, 8, 2, 64), (5, 7, 3, 80), (3, 9, 1, 16)]


def attention_model(ops_library, heads: int, scale: float, matrix: bool, bf16: bool) -> ov.Model:
    """One GlobalAttention node over six dynamic-size parameters."""
    from openvino import opset13 as ops
    from openvino.utils.node_factory import NodeFactory

    params = [ops.parameter([-1, -1, -1], ov.Type.f32) for _ in range(3)]
    params += [ops.parameter([-1, heads, -1, -1], ov.Type.f32) for _ in range(2)]
    params += [ops.parameter([-1, -1], ov.Type.f32)]
    factory = NodeFactory()
    factory.add_extension(str(ops_library.path))
    node = factory.create(openvino_ops.ATTENTION_OP_TYPE, [p.output(0) for p in params],
                          {"heads": heads, "scale": scale, "matrix": matrix, "bf16": bf16})
    return ov.Model(node.outputs(), params)


def attention_inputs(batch: int, grid_h: int, grid_w: int, heads: int, width: int, seed: int) -> list[torch.Tensor]:
    """q, k, v, relative-position terms of a few units (so they move the softmax), and query weights that
    leave the last third of the queries out (the padding's tokens)."""
    generator = torch.Generator().manual_seed(seed)
    n = grid_h * grid_w
    q, k, v = (torch.randn(batch, n, heads * width, generator=generator) for _ in range(3))
    rel_h = torch.randn(batch, heads, n, grid_h, generator=generator) * 2
    rel_w = torch.randn(batch, heads, n, grid_w, generator=generator) * 2
    weights = torch.zeros(batch, n)
    weights[:, : n - n // 3] = 1.0 / (n - n // 3)
    return [q, k, v, rel_h, rel_w, weights]


def run(ops_library, inputs: list[torch.Tensor], heads: int, matrix: bool, bf16: bool, threads: int = 2
        ) -> list[np.ndarray]:
    width = inputs[0].shape[-1] // heads
    compiled = ops_library.add_to(ov.Core()).compile_model(
        attention_model(ops_library, heads, width ** -0.5, matrix, bf16), "CPU",
        {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32", "INFERENCE_NUM_THREADS": threads})
    results = compiled([t.numpy() for t in inputs])
    return [np.asarray(results[i]) for i in range(len(compiled.outputs))]


def expected(inputs: list[torch.Tensor], heads: int, matrix: bool) -> tuple[torch.Tensor, ...]:
    width = inputs[0].shape[-1] // heads
    q, k, v, rel_h, rel_w, weights = (t.double() for t in inputs)
    return reference(q, k, v, rel_h, rel_w, weights, heads, width ** -0.5, matrix)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("matrix", [False, True], ids=["received", "matrix"])
@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
def test_kernel_equals_sams_arithmetic(ops_library, shape, matrix, bf16):
    grid_h, grid_w, heads, width = shape
    inputs = attention_inputs(2, grid_h, grid_w, heads, width, seed=grid_h * 10 + grid_w)
    ours = run(ops_library, inputs, heads, matrix, bf16)
    theirs = expected(inputs, heads, matrix)
    assert len(ours) == len(theirs) == (4 if matrix else 2)
    assert ours[-1].dtype == (np.float16 if matrix else np.float32)
    # bf16: q and k rounded to 8 bits move the logits by ~|q||k| 2^-8, the probabilities by as much in relative terms
    tolerance = {"rtol": 3e-2, "atol": 3e-2} if bf16 else {"rtol": 1e-5, "atol": 2e-6}
    torch.testing.assert_close(torch.from_numpy(ours[0]).double(), theirs[0], **tolerance)
    reductions = {"rtol": 3e-2, "atol": 1e-3} if bf16 else {"rtol": 1e-5, "atol": 1e-7}
    for got, want in zip(ours[1:], theirs[1:], strict=True):
        torch.testing.assert_close(torch.from_numpy(got.astype(np.float64)), want.double(),
                                   **(reductions if got.dtype == np.float32 else {"rtol": 5e-3, "atol": 1e-3}))
    # Each query's probabilities sum to one, so the weighted key sums do too (the weights sum to one).
    np.testing.assert_allclose(ours[1].sum(-1), 1.0, atol=1e-3 if bf16 else 1e-5)
    if matrix:
        np.testing.assert_allclose(ours[3].astype(np.float64).sum(-1), 1.0, atol=5e-3)
        np.testing.assert_allclose(ours[2].sum(-1), 1.0, atol=1e-3 if bf16 else 1e-5)


@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
def test_results_do_not_depend_on_the_thread_count(ops_library, bf16):
    """Outputs per query are made by one task each: equal bit for bit. The key sums add the threads'
    partial sums, so they may differ in the last bits."""
    inputs = attention_inputs(1, 9, 11, 2, 64, seed=3)
    one, two = (run(ops_library, inputs, 2, True, bf16, threads) for threads in (1, 2))
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[3], two[3])
    np.testing.assert_allclose(one[1], two[1], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(one[2], two[2], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("broken, message", [
    (lambda t: t.__setitem__(1, t[1][:, :-1]), "input 1 has shape"),
    (lambda t: t.__setitem__(3, t[3][..., :-1]), "H \\* W = N"),
    (lambda t: t.__setitem__(5, t[5][:, :-1]), "query_weights .* must be \\(B, N\\)"),
    (lambda t: [t.__setitem__(i, t[i][..., :-1]) for i in range(3)], "q must be \\(B, N, heads \\* d\\)"),
])
def test_inconsistent_inputs_are_refused_naming_what_is_wrong(ops_library, broken, message):
    inputs = attention_inputs(1, 4, 4, 2, 16, seed=1)
    broken(inputs)
    with pytest.raises(RuntimeError, match=message):
        run(ops_library, [t.contiguous() for t in inputs], 2, False, False)


@pytest.fixture(scope="module")
def config(tiny_cache, tmp_path_factory) -> EngineConfig:
    return EngineConfig.from_file(tiny_cache / "engine.json", runtime="openvino",
                                  openvino_cache_dir=tmp_path_factory.mktemp("openvino_cache"))


def test_fused_form_computes_the_explicit_forms_outputs_on_torch(config):
    """The operation's torch body (what export traces) is the explicit capture graph's arithmetic."""
    sam = build_sam(config)
    use_fast_attention(sam.image_encoder)
    n = 64 * 64
    # Seeded: the draw is the test's own, not whatever the global generator holds after other modules' tests
    # (one of ~1M features then missed atol 1e-6 by 3%: float rounding of sums taken in another order).
    image, weights = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0)), torch.zeros(1, n)
    weights[:, : n // 2] = 2.0 / n
    with torch.no_grad():
        explicit = CapturingEncoder(sam.image_encoder)(image, weights)
        fused = CapturingEncoder(sam.image_encoder, attention="fused")(image, weights)
    assert len(explicit) == len(fused) == 1 + len(global_block_indices(sam.image_encoder)) + 2
    for a, b in zip(explicit, fused, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-4, atol=1e-5)


def _fused(ops_library):
    def use(self):
        return ops_library
    return use


def test_capture_graph_with_the_node_equals_torch_capture(config, ops_library, chelsea, monkeypatch, tmp_path):
    """The whole capture graph with every global block as the library's node (its f32 path, on any CPU):
    the features and each reduction where the engine reads them, as the torch runtime's capture."""
    monkeypatch.setattr(OpenVinoImageEncoder, "_fused_attention_ops", _fused(ops_library))
    sam = build_sam(config)
    x, input_size = SamSegmenter(sam, CPU).preprocess(chelsea)
    theirs = TorchImageEncoder(sam.image_encoder).encode(x, input_size, capture=True)
    runtime = OpenVinoImageEncoder(sam.image_encoder, torch.float32, CPU, capture=True, cache_dir=tmp_path,
                                   identity={"sam_variant": "tiny"})
    assert "fused" in runtime.conversions[True].path.with_suffix(".json").read_text()
    ours = runtime.encode(x, input_size, capture=True)
    np.testing.assert_allclose(ours.features.numpy(), theirs.features.numpy(), rtol=1e-4, atol=1e-4)
    assert ours.attention is not None and theirs.attention is not None
    assert sorted(ours.attention.received) == sorted(theirs.attention.received)
    for block, want in theirs.attention.received.items():
        np.testing.assert_allclose(ours.attention.received[block], want, rtol=1e-4, atol=1e-8)
    mine, other = ours.attention.last_block, theirs.attention.last_block
    assert mine.matrix.dtype == np.float16 and mine.matrix.shape == other.matrix.shape
    np.testing.assert_allclose(mine.matrix.astype(np.float32), other.matrix.astype(np.float32), rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(mine.received, other.received, rtol=1e-4, atol=1e-9)


def _graph_nodes(runtime: OpenVinoImageEncoder, ops_library) -> list[str]:
    core = ops_library.add_to(ov.Core())
    return [op.get_type_name() for op in core.read_model(runtime.conversions[True].path).get_ops()]


def test_runtime_uses_the_node_for_bf16_where_the_cpu_has_bf16_products(config, ops_library, monkeypatch, tmp_path):
    """bf16 on a CPU with AMX or AVX512-BF16: one node per global block. Without either, or at f32,
    OpenVINO's own ops (the kernel's other path is plain C++), under another cache name."""
    import backend.models

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    sam = build_sam(config)
    blocks = len(global_block_indices(sam.image_encoder))
    bf16_flags = openvino_ops.AMX_FLAGS | {openvino_ops.DOT_BF16_FLAG}
    with_amx, without = cpu_flags() | bf16_flags, cpu_flags() - bf16_flags
    for flags in (with_amx, with_amx - openvino_ops.AMX_FLAGS):
        monkeypatch.setattr(backend.models, "cpu_flags", lambda flags=flags: flags)
        fused = OpenVinoImageEncoder(build_sam(config).image_encoder, torch.bfloat16, CPU, capture=True,
                                     cache_dir=tmp_path, identity={"sam_variant": "tiny"})
        assert _graph_nodes(fused, ops_library).count(openvino_ops.ATTENTION_OP_TYPE) == blocks
    for dtype, flags in ((torch.float32, with_amx), (torch.bfloat16, without)):
        monkeypatch.setattr(backend.models, "cpu_flags", lambda flags=flags: flags)
        runtime = OpenVinoImageEncoder(build_sam(config).image_encoder, dtype, CPU, capture=True, cache_dir=tmp_path,
                                       identity={"sam_variant": "tiny"})
        assert openvino_ops.ATTENTION_OP_TYPE not in _graph_nodes(runtime, ops_library)
        assert runtime.conversions[True].path != fused.conversions[True].path


def test_without_the_library_the_capture_graph_keeps_openvinos_ops(config, ops_library, monkeypatch, tmp_path, caplog):
    import backend.models

    monkeypatch.setattr(backend.models, "cpu_flags", lambda: cpu_flags() | openvino_ops.AMX_FLAGS)
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    sam = build_sam(config)
    with caplog.at_level(logging.WARNING):
        runtime = OpenVinoImageEncoder(sam.image_encoder, torch.bfloat16, CPU, capture=True,
                                       cache_dir=tmp_path / "fresh", identity={"sam_variant": "tiny"})
    assert openvino_ops.ATTENTION_OP_TYPE not in _graph_nodes(runtime, ops_library)
    assert [r.getMessage() for r in caplog.records if "operations library is not available" in r.getMessage()]


def test_a_fused_graph_that_fails_is_made_with_openvinos_ops(config, ops_library, chelsea, monkeypatch, tmp_path,
                                                              caplog):
    """The node's conversion failing costs the speed-up, not OpenVINO: one log line, the explicit graph."""
    def broken(self, model):
        raise openvino_ops.OpsLibraryError("planted failure")

    monkeypatch.setattr(OpenVinoImageEncoder, "_fused_attention_ops", _fused(ops_library))
    monkeypatch.setattr(openvino_ops.OpsLibrary, "connect_outputs", broken)
    sam = build_sam(config)
    x, input_size = SamSegmenter(sam, CPU).preprocess(chelsea)
    with caplog.at_level(logging.WARNING):
        runtime = OpenVinoImageEncoder(sam.image_encoder, torch.float32, CPU, capture=True, cache_dir=tmp_path,
                                       identity={"sam_variant": "tiny"})
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "planted failure" in lines[0] and "OpenVINO's own ops" in lines[0]
    assert openvino_ops.ATTENTION_OP_TYPE not in _graph_nodes(runtime, ops_library)
    theirs = TorchImageEncoder(sam.image_encoder).encode(x, input_size, capture=True)
    ours = runtime.encode(x, input_size, capture=True)
    for block, want in theirs.attention.received.items():
        np.testing.assert_allclose(ours.attention.received[block], want, rtol=1e-4, atol=1e-8)


def test_planted_attention_lands_on_the_right_token_through_the_node(config, ops_library, monkeypatch, tmp_path):
    """tests/test_sam_attention.py's geometry check through the capture graph with the library's node: an
    encoder made so every query of global block 1 attends to one token finds that token, padding excluded."""
    from backend.encoder_runtime import build_encoder_runtime
    from tests.test_sam_attention import _planted_encoder

    monkeypatch.setattr(OpenVinoImageEncoder, "_fused_attention_ops", _fused(ops_library))
    r, c = 10, 42  # 500 x 333 photo -> 1024 x 682 input: column 42 is the last, partial token column
    encoder, image = _planted_encoder(build_sam(config), r, c)
    runtime = build_encoder_runtime(config.replace(openvino_cache_dir=tmp_path), encoder, CPU, torch.float32)
    assert isinstance(runtime, OpenVinoImageEncoder)
    assert openvino_ops.ATTENTION_OP_TYPE in _graph_nodes(runtime, ops_library)
    received = runtime.encode(image, (1024, 682), capture=True).attention.received[1]
    assert np.unravel_index(received.argmax(), received.shape) == (r, c)
    assert received[r, c] > 0.99
