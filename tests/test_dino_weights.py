"""Grounding DINO's torch weights are freed once both its halves run on OpenVINO, and loaded again
(from the checkpoint) only for an input the graphs don't serve: the results stay torch's."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from backend.config import EngineConfig
from backend.engine import Engine

PROMPT = "cat . person . helmet"


@pytest.fixture(scope="module")
def config(engine_config, tmp_path_factory) -> EngineConfig:
    return engine_config.replace(precision="fp32", openvino_cache_dir=tmp_path_factory.mktemp("openvino"))


@pytest.fixture(scope="module")
def on_openvino(config) -> Engine:
    return Engine(config.replace(runtime="openvino"))


@pytest.fixture(scope="module")
def on_torch(config) -> Engine:
    return Engine(config.replace(runtime="torch"))


def stored_bytes(module: torch.nn.Module) -> int:
    return sum(t.untyped_storage().nbytes() for t in (*module.parameters(), *module.buffers()))


def test_openvino_engine_frees_grounding_dinos_torch_weights(on_openvino, on_torch):
    detector = on_openvino.detector
    assert (detector.text_runtime.name, detector.image_runtime.name) == ("openvino", "openvino")
    kept = stored_bytes(on_torch.detector.model)
    assert kept > 1_000_000  # the tiny model's weights, as the torch engine keeps them
    # One element per tensor is left: the structure (tokenizer, shapes) stays for the detector's use.
    tensors = len([*detector.model.parameters(), *detector.model.buffers()])
    assert stored_bytes(detector.model) <= 8 * tensors
    assert detector.model.tokenizer is not None and detector.reloaded is not None


def test_torch_engine_keeps_its_weights(on_torch):
    assert on_torch.detector.reloaded is None
    assert on_torch.detector.torch_model() is on_torch.detector.model


def test_input_the_graphs_dont_serve_reloads_the_weights_once(on_openvino, on_torch, chelsea, caplog):
    """A strip whose short side is under 65 px after the resize: the image half's graph does not
    serve it, so its fallback loads the torch model again; boxes and masks equal the torch engine's."""
    strip = np.ascontiguousarray(chelsea[100:120])  # 20 x 451: the short side well under 65 px after the resize
    reloaded = on_openvino.detector.reloaded
    assert reloaded is not None and not reloaded.loaded
    with caplog.at_level(logging.INFO, logger="backend.dino_weights"):
        ours = on_openvino.segment(strip, PROMPT, box_threshold=0.0, text_threshold=0.0)
        again = on_openvino.segment(strip[:, ::-1].copy(), PROMPT, box_threshold=0.0, text_threshold=0.0)
    theirs = on_torch.segment(strip, PROMPT, box_threshold=0.0, text_threshold=0.0)
    assert reloaded.loaded and again
    loads = [r for r in caplog.records if "loaded again" in r.getMessage()]
    assert len(loads) == 1 and "the image half's graph does not serve a" in loads[0].getMessage()
    assert [s.label for s in ours] == [s.label for s in theirs] and ours
    np.testing.assert_allclose([s.box for s in ours], [s.box for s in theirs], atol=1e-3)
    for a, b in zip(ours, theirs, strict=True):
        assert (a.mask != b.mask).mean() < 1e-3
    # The reloaded model has the checkpoint's weights, not the freed ones.
    assert stored_bytes(on_openvino.detector.torch_model()) == stored_bytes(on_torch.detector.model)


def test_text_halfs_fallback_runs_the_reloaded_model(on_openvino, on_torch, astronaut):
    """The text half's fallback (a caption or feature map past the graph's bounds) computes torch's
    predictions with the reloaded weights."""
    from backend.detector import Caption

    detector, reference = on_openvino.detector, on_torch.detector
    features = reference.image_features(astronaut)
    caption = Caption.build(["person", "helmet"], reference.tokenizer, reference.max_text_tokens)
    inputs = reference.text_inputs(features, caption)
    logits, boxes = detector.text_runtime.fallback.run(inputs)
    want_logits, want_boxes = reference.text_runtime.run(inputs)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(boxes, want_boxes, atol=1e-5, rtol=1e-5)
