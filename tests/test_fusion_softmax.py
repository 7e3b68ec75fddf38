"""The fusion layers' two softmaxes as the operations library's node (backend/csrc/fusion_softmax.cpp,
``fusion_attention.fusion_softmax``): equal to groundingdino's arithmetic (``fusion_attention.softmaxes``,
float64) with image and text padding, with and without the global-max shift, with the clamps acting, at
caption lengths from 1 to 256 tokens; in bf16 (as bf16 graphs run it) the f32 results rounded to nearest
even; the same for any thread count; inconsistent inputs refused naming what is wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend import openvino_ops
from backend.fusion_attention import softmaxes

ov = pytest.importorskip("openvino")

HEADS = 4


def op_model(ops_library, stable: bool = True, clamp_min: bool = True, clamp_max: bool = True) -> ov.Model:
    """One FusionSoftmax node over dynamic-size parameters: logits, image padding, text padding."""
    from openvino import opset13 as ops
    from openvino.utils.node_factory import NodeFactory

    params = [ops.parameter([-1, -1], ov.Type.f32), ops.parameter([-1], ov.Type.boolean),
              ops.parameter([-1], ov.Type.boolean)]
    factory = NodeFactory()
    factory.add_extension(str(ops_library.path))
    node = factory.create(openvino_ops.FUSION_OP_TYPE, [p.output(0) for p in params],
                          {"heads": HEADS, "stable": stable, "clamp_min": clamp_min, "clamp_max": clamp_max})
    return ov.Model(node.outputs(), params)


def op_inputs(rows: int, tokens: int, seed: int, scale: float = 4.0, padded: bool = True) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, HEADS * tokens, generator=generator) * scale
    image_padding = torch.zeros(rows, dtype=torch.bool)
    text_padding = torch.zeros(tokens, dtype=torch.bool)
    if padded:
        image_padding[rows - rows // 7:] = True
        text_padding[tokens - tokens // 3:] = True
    return [logits, image_padding, text_padding]


def run(compiled, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    outputs = compiled([t.numpy() for t in inputs])
    return torch.from_numpy(np.asarray(outputs[0])), torch.from_numpy(np.asarray(outputs[1]))


@pytest.mark.parametrize("tokens", [1, 27, 256])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("stable", [True, False], ids=["shifted", "unshifted"])
def test_node_equals_groundingdinos_arithmetic(ops_library, tokens, padded, stable):
    compiled = ops_library.add_to(ov.Core()).compile_model(op_model(ops_library, stable=stable), "CPU",
                                                           {"INFERENCE_PRECISION_HINT": "f32"})
    inputs = op_inputs(301, tokens, seed=tokens, padded=padded)
    to_text, to_image = run(compiled, inputs)
    want_text, want_image = softmaxes(inputs[0].double(), inputs[1], inputs[2], HEADS, stable, True, True)
    assert to_text.shape == to_image.shape == inputs[0].shape
    torch.testing.assert_close(to_text.double(), want_text, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(to_image.double(), want_image, atol=1e-6, rtol=1e-5)
    if padded:
        assert (to_text[inputs[1]] == 0).all() and (to_image.view(301, HEADS, tokens)[..., inputs[2]] == 0).all()
    assert (want_text.sum(0) - 1).abs().max() < 1e-9  # each column a distribution over the image tokens


@pytest.mark.parametrize("clamps", [(True, True), (True, False), (False, True)])
def test_clamps_act_as_in_groundingdino(ops_library, clamps):
    """Logits spread far past +-50000: the shift and the clamps decide the probabilities."""
    compiled = ops_library.add_to(ov.Core()).compile_model(op_model(ops_library, True, *clamps), "CPU",
                                                           {"INFERENCE_PRECISION_HINT": "f32"})
    inputs = op_inputs(200, 9, seed=3, scale=60000.0)
    want_text, want_image = softmaxes(inputs[0].double(), inputs[1], inputs[2], HEADS, True, *clamps)
    to_text, to_image = run(compiled, inputs)
    torch.testing.assert_close(to_text.double(), want_text, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(to_image.double(), want_image, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tokens", [27, 5])
def test_bf16_io_is_the_f32_node_rounded_to_nearest_even(ops_library, tokens):
    core = ops_library.add_to(ov.Core())
    plain = core.compile_model(op_model(ops_library), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    narrowed_model = ops_library.narrow_io(op_model(ops_library))
    node = next(op for op in narrowed_model.get_ordered_ops() if op.get_type_name() == openvino_ops.FUSION_OP_TYPE)
    assert node.get_input_element_type(0) == ov.Type.bf16
    assert [node.get_output_element_type(i) for i in (0, 1)] == [ov.Type.bf16, ov.Type.bf16]
    narrowed = core.compile_model(narrowed_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    inputs = op_inputs(1000, tokens, seed=5)
    inputs[0] = inputs[0].bfloat16().float()  # the numbers both nodes read: bf16's
    for f32, bf16 in zip(run(plain, inputs), run(narrowed, inputs), strict=True):
        assert (f32 != f32.bfloat16().float()).float().mean() > 0.5  # the f32 results are not bf16 numbers
        assert torch.equal(bf16, f32.bfloat16().float())


def test_results_do_not_depend_on_the_thread_count(ops_library):
    inputs = [t.numpy() for t in op_inputs(5000, 27, seed=6)]
    outputs = []
    for threads in (1, 2):
        compiled = ops_library.add_to(ov.Core()).compile_model(
            op_model(ops_library), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
        outputs.append([np.asarray(out) for out in compiled(inputs).values()])
    assert all(np.array_equal(a, b) for a, b in zip(*outputs, strict=True))


@pytest.mark.parametrize("broken, message", [
    ("width", "not heads"),
    ("image_padding", "image_padding has"),
])
def test_inconsistent_inputs_are_refused_naming_what_is_wrong(ops_library, broken, message):
    compiled = ops_library.add_to(ov.Core()).compile_model(op_model(ops_library), "CPU",
                                                           {"INFERENCE_PRECISION_HINT": "f32"})
    inputs = op_inputs(50, 6, seed=7)
    if broken == "width":
        inputs[0] = inputs[0][:, :-1]
    else:
        inputs[1] = inputs[1][:-3]
    with pytest.raises(RuntimeError, match=message):
        compiled([t.numpy() for t in inputs])
