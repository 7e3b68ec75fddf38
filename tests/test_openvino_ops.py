"""The OpenVINO operations library (backend/openvino_ops.py, backend/csrc/deformable_attention.cpp):
built once per source and machine, reused, refused with a clear error where it can't build; its
deformable attention kernel equals groundingdino's arithmetic (``dino_fast.fused_deformable_attention``
on torch, float64) at Grounding DINO's own width, for points and boxes, batches, and any thread count,
and names what is wrong with inconsistent inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend import openvino_ops
from backend.dino_fast import fused_deformable_attention

ov = pytest.importorskip("openvino")

HEADS, CHANNELS, POINTS = 8, 32, 4  # Grounding DINO's (SwinT-OGC): the kernel's fixed-width path
SIZES = [(23, 31), (12, 16), (6, 8), (3, 4)]


def op_model(ops_library, ref_dim: int, points: int = POINTS, levels: int = len(SIZES), softmax: bool = False
             ) -> ov.Model:
    """One DeformableAttention node over six dynamic-size parameters (``softmax``: its weights are logits)."""
    from openvino import opset13 as ops
    from openvino.utils.node_factory import NodeFactory

    params = [ops.parameter([-1, -1, HEADS * CHANNELS], ov.Type.f32), ops.parameter([-1, 2], ov.Type.i64),
              ops.parameter([-1, -1, levels, ref_dim], ov.Type.f32),
              ops.parameter([-1, -1, HEADS * levels * points * 2], ov.Type.f32),
              ops.parameter([-1, -1, HEADS * levels * points], ov.Type.f32), ops.parameter([-1, -1], ov.Type.boolean)]
    factory = NodeFactory()
    factory.add_extension(str(ops_library.path))
    node = factory.create(openvino_ops.OP_TYPE, [p.output(0) for p in params],
                          {"heads": HEADS, "points": points, "softmax": softmax})
    return ov.Model([node.output(0)], params)


def op_inputs(batch: int, queries: int, ref_dim: int, seed: int, sizes=SIZES, points: int = POINTS
              ) -> list[torch.Tensor]:
    """value, spatial shapes, reference points (spread past the map's edges), offsets of a few pixels, weights,
    padding (none)."""
    generator = torch.Generator().manual_seed(seed)
    levels, keys = len(sizes), sum(h * w for h, w in sizes)
    reference = torch.rand(batch, queries, levels, 2, generator=generator) * 1.4 - 0.2
    if ref_dim == 4:
        reference = torch.cat([reference, torch.rand(batch, queries, levels, 2, generator=generator) * 0.6], -1)
    weights = torch.randn(batch, queries, HEADS, levels * points, generator=generator).softmax(-1)
    return [torch.randn(batch, keys, HEADS * CHANNELS, generator=generator), torch.tensor(sizes),
            reference, torch.randn(batch, queries, HEADS * levels * points * 2, generator=generator) * 3,
            weights.reshape(batch, queries, -1), torch.zeros(batch, keys, dtype=torch.bool)]


def expected(inputs: list[torch.Tensor], points: int = POINTS, softmax: bool = False) -> torch.Tensor:
    value, shapes, reference, offsets, weights, padding = inputs
    return fused_deformable_attention(value.double(), shapes, reference.double(), offsets.double(), weights.double(),
                                      HEADS, points, padding, softmax)


@pytest.mark.parametrize("ref_dim", [2, 4], ids=["points", "boxes"])
@pytest.mark.parametrize("points, sizes", [(3, SIZES), (8, SIZES[:2]), (16, SIZES[2:3])],
                         ids=["12-samples", "2-levels-x-8", "1-level-x-16"])
def test_other_sample_counts_equal_groundingdinos_arithmetic(ops_library, ref_dim, points, sizes):
    """Grounding DINO samples 4 levels x 4 points per head, which the kernel takes in one AVX-512 register per
    coordinate; other counts of 16 take the same path with fewer levels' reference points, others the scalar
    loop. Each against float64 arithmetic."""
    core = ops_library.add_to(ov.Core())
    compiled = core.compile_model(op_model(ops_library, ref_dim, points, len(sizes)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    keys = sum(h * w for h, w in sizes)
    for queries in (301, keys // 5):  # as many queries as keys (each head's map copied out), and few (read in place)
        inputs = op_inputs(2, queries, ref_dim, seed=points, sizes=sizes, points=points)
        reference = expected(inputs, points)
        ours = torch.from_numpy(np.asarray(compiled([t.numpy() for t in inputs])[0]))
        assert (reference != 0).double().mean() > 0.5  # most samples land inside (one 6 x 8 map: fewer than 4)
        torch.testing.assert_close(ours.double(), reference, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("ref_dim", [2, 4], ids=["points", "boxes"])
@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_kernel_equals_groundingdinos_arithmetic(ops_library, ref_dim, precision):
    core = ops_library.add_to(ov.Core())
    compiled = core.compile_model(op_model(ops_library, ref_dim), "CPU", {"INFERENCE_PRECISION_HINT": precision})
    for batch, queries, seed in [(1, 700, 0), (2, 37, 1), (1, 1, 2)]:
        inputs = op_inputs(batch, queries, ref_dim, seed)
        reference = expected(inputs)
        ours = torch.from_numpy(np.asarray(compiled([t.numpy() for t in inputs])[0]))
        assert ours.shape == reference.shape == (batch, queries, HEADS * CHANNELS)
        assert (reference != 0).double().mean() > 0.9  # samples landed inside the maps
        # The kernel reads its inputs in f32 whatever the graph's precision hint: f32 rounding only.
        torch.testing.assert_close(ours.double(), reference, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("ref_dim", [2, 4], ids=["points", "boxes"])
@pytest.mark.parametrize("points, queries", [(POINTS, 301), (POINTS, 40), (3, 301)],
                         ids=["vector-per-head-copy", "vector-in-place", "scalar"])
def test_bf16_io_is_the_f32_kernel_rounded_to_nearest_even(ops_library, ref_dim, points, queries):
    """With value, offsets and weights in bf16 (``narrow_io``, as bf16 graphs run the node), the
    output is the f32 node's on the same bf16 numbers, rounded to nearest even: the same sums, no other
    rounding. Every path: 16 samples per head with each head's map copied out or read in place (few queries),
    and the scalar loop (12 samples)."""
    core = ops_library.add_to(ov.Core())
    plain = core.compile_model(op_model(ops_library, ref_dim, points), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    narrowed_model = ops_library.narrow_io(op_model(ops_library, ref_dim, points))
    node = next(op for op in narrowed_model.get_ordered_ops() if op.get_type_name() == openvino_ops.OP_TYPE)
    assert [node.get_input_element_type(i) for i in (0, 2, 3, 4)] == [ov.Type.bf16, ov.Type.f32, ov.Type.bf16,
                                                                       ov.Type.bf16]
    assert node.get_output_element_type(0) == ov.Type.bf16
    narrowed = core.compile_model(narrowed_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    inputs = op_inputs(2, queries, ref_dim, seed=11, points=points)
    for index in (0, 3, 4):  # the numbers both nodes read: bf16's
        inputs[index] = inputs[index].bfloat16().float()
    inputs[3][0, 0, :4] = torch.tensor([1e30, float("nan"), -3.0, float("inf")])  # outside, NaN: add nothing
    f32 = torch.from_numpy(np.asarray(plain([t.numpy() for t in inputs])[0]))
    bf16 = torch.from_numpy(np.asarray(narrowed([t.numpy() for t in inputs])[0]))
    assert (f32 != f32.bfloat16().float()).float().mean() > 0.9  # the f32 sums are not bf16 numbers
    assert torch.equal(bf16, f32.bfloat16().float())


def test_narrowing_keeps_a_bf16_node_as_it_is(ops_library):
    model = ops_library.narrow_io(op_model(ops_library, 2))
    count = len(model.get_ordered_ops())
    assert len(ops_library.narrow_io(model).get_ordered_ops()) == count


@pytest.mark.parametrize("points, queries", [(POINTS, 301), (POINTS, 40), (3, 301)],
                         ids=["vector-per-head-copy", "vector-in-place", "scalar"])
def test_padding_and_softmax_in_the_node_equal_groundingdinos_arithmetic(ops_library, points, queries):
    """As DinoTextGraph runs the node: the weights are the attention_weights projection's logits
    (softmaxed per query and head in the node) and padding tokens' values are read as zeros
    (groundingdino zeroes them before sampling). Every path, against float64 arithmetic."""
    compiled = ops_library.add_to(ov.Core()).compile_model(op_model(ops_library, 4, points, softmax=True), "CPU",
                                                           {"INFERENCE_PRECISION_HINT": "f32"})
    inputs = op_inputs(2, queries, 4, seed=13, points=points)
    inputs[4] = inputs[4] * 20 - 10  # logits, not probabilities
    start = 0
    for h, w in SIZES:  # pad each level's last row and column in image 1, and a few tokens in image 0
        level = inputs[5][1, start:start + h * w].view(h, w)
        level[-1], level[:, -1] = True, True
        start += h * w
    inputs[5][0, 100:130] = True
    ours = torch.from_numpy(np.asarray(compiled([t.numpy() for t in inputs])[0]))
    reference = expected(inputs, points, softmax=True)
    unmasked = expected([*inputs[:5], torch.zeros_like(inputs[5])], points, softmax=True)
    assert (reference - unmasked).abs().amax() > 0.1  # the padding changed what was sampled
    torch.testing.assert_close(ours.double(), reference, atol=2e-5, rtol=1e-5)


def test_results_do_not_depend_on_the_thread_count(ops_library):
    model = op_model(ops_library, 2)
    inputs = [t.numpy() for t in op_inputs(1, 900, 2, seed=3)]
    outputs = []
    for threads in (1, 2):
        compiled = ops_library.add_to(ov.Core()).compile_model(
            model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
        outputs.append(np.asarray(compiled(inputs)[0]))
    assert np.array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("broken, message", [
    ("levels", "the levels hold"),
    ("offsets", "offsets / weights do not match"),
    ("reference", "reference_points must be"),
])
def test_inconsistent_inputs_are_refused_naming_what_is_wrong(ops_library, broken, message):
    compiled = ops_library.add_to(ov.Core()).compile_model(op_model(ops_library, 2), "CPU",
                                                           {"INFERENCE_PRECISION_HINT": "f32"})
    inputs = op_inputs(1, 20, 2, seed=4)
    if broken == "levels":
        inputs[1] = torch.tensor([(h, w + 1) for h, w in SIZES])
    elif broken == "offsets":
        inputs[3] = inputs[3][:, :10]
    else:
        inputs[2] = inputs[2][:, :10]
    with pytest.raises(RuntimeError, match=message):
        compiled([t.numpy() for t in inputs])


def test_build_is_reused_and_rebuilt_for_a_changed_source(ops_library, tmp_path, monkeypatch):
    first = openvino_ops.build(tmp_path)
    assert first.built and first.path.parent == tmp_path and first.path.name.startswith("gsam_ops-")
    again = openvino_ops.build(tmp_path)
    assert not again.built and again.path == first.path
    assert not list(tmp_path.glob(".building-*"))  # the temporary build folder is gone
    changed = tmp_path / "src" / openvino_ops.SOURCE.name
    changed.parent.mkdir()
    changed.write_text(openvino_ops.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(openvino_ops, "SOURCE", changed)
    other = openvino_ops.build(tmp_path)
    assert other.built and other.path != first.path


@pytest.mark.parametrize("compiler, message", [
    ("/nonexistent/g++", "does not run"),
    ("false", "failed on ops.cpp"),
])
def test_a_compiler_that_does_not_work_is_a_clear_error(tmp_path, monkeypatch, compiler, message):
    monkeypatch.setenv("CXX", compiler)
    with pytest.raises(openvino_ops.OpsLibraryError, match=message):
        openvino_ops.load(tmp_path)
    assert not list(tmp_path.glob("*.so"))


def test_compile_errors_are_named(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(openvino_ops, "SOURCE", broken)
    with pytest.raises(openvino_ops.OpsLibraryError, match=r"failed on broken.cpp \(exit 1\).*error"):
        openvino_ops.build(tmp_path / "out")


def test_a_library_file_that_does_not_load_is_built_again(tmp_path, monkeypatch, caplog):
    """A file under the library's name that is not a library (a truncated copy, say) is replaced, not trusted.
    A source of its own gives this test a digest no other test has loaded in this process."""
    import logging

    source = tmp_path / "src" / openvino_ops.SOURCE.name
    source.parent.mkdir()
    source.write_text(openvino_ops.SOURCE.read_text() + "\n// built again\n")
    monkeypatch.setattr(openvino_ops, "SOURCE", source)
    folder = tmp_path / "ops"
    expected_path = folder / f"gsam_ops-{openvino_ops._toolchain().digest}.so"
    folder.mkdir()
    expected_path.write_bytes(b"not a shared library")
    with caplog.at_level(logging.WARNING):
        library = openvino_ops.load(folder)
    assert library.built and library.path == expected_path and expected_path.stat().st_size > 10_000
    assert any("does not load" in r.getMessage() and "building it again" in r.getMessage() for r in caplog.records)
    assert openvino_ops.OP_TYPE in {node.get_type_name() for node in op_model(library, 2).get_ops()}


@pytest.mark.parametrize("offset", [1e30, -1e30, float("nan"), float("inf")])
def test_samples_far_outside_or_nan_add_nothing(ops_library, offset):
    """Positions past any map (or NaN: a diverged model) contribute zero, as grid_sample's zeros padding,
    instead of an integer conversion out of range."""
    compiled = ops_library.add_to(ov.Core()).compile_model(op_model(ops_library, 2), "CPU",
                                                           {"INFERENCE_PRECISION_HINT": "f32"})
    inputs = op_inputs(1, 50, 2, seed=5)
    inputs[3] = torch.full_like(inputs[3], offset)
    inputs[3][:, 25:] = 0  # the last 25 queries sample at their reference points
    ours = np.asarray(compiled([t.numpy() for t in inputs])[0])
    assert np.array_equal(ours[:, :25], np.zeros_like(ours[:, :25]))
    torch.testing.assert_close(torch.from_numpy(ours[:, 25:]).double(), expected(inputs)[:, 25:], atol=2e-5, rtol=1e-5)


def test_a_loaded_library_is_reused_while_its_file_exists(ops_library, tmp_path):
    """Engines with other cache folders in one process share the loaded library; once its file is gone
    (a deleted temporary folder) the next load builds one in its own folder, so Cores can still read IR."""
    import shutil

    source_copy = tmp_path / "src" / openvino_ops.SOURCE.name
    source_copy.parent.mkdir()
    source_copy.write_text(openvino_ops.SOURCE.read_text() + "\n// reuse\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(openvino_ops, "SOURCE", source_copy)
        first = openvino_ops.load(tmp_path / "a")
        assert openvino_ops.load(tmp_path / "b") == first and not (tmp_path / "b").exists()
        shutil.rmtree(tmp_path / "a")
        again = openvino_ops.load(tmp_path / "b")
    assert again.built and again.path.parent == tmp_path / "b" and again.path.name == first.path.name
    assert openvino_ops.OP_TYPE in {node.get_type_name() for node in op_model(again, 2).get_ops()}
