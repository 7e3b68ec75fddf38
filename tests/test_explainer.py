"""Explanations at the engine level: recorded in the passes that make the masks, reduced right,
cached, and laid over the original image (tiny random-weight models, real photos)."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import numpy as np
import pytest

from backend import sam_attention
from backend.config import EngineConfig
from backend.engine import Engine
from backend.explainer import render_explanation
from tests.sam_encodes import counting_sam_encodes

PROMPT = "cat . dog"
THRESHOLDS = dict(box_threshold=0.3, text_threshold=0.25)


@contextmanager
def counting_forwards(*modules):
    """Counts forward calls of each torch module (hooks, so the models' own code runs untouched). SAM's
    image encoder is counted with ``counting_sam_encodes`` instead: it may run on OpenVINO."""
    counts = [0] * len(modules)
    handles = []
    for i, module in enumerate(modules):
        def hook(*_args, i=i):
            counts[i] += 1
        handles.append(module.register_forward_hook(hook))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module")
def explanation(engine, chelsea):
    return engine.explain(chelsea, PROMPT, **THRESHOLDS)


def engine_features(engine: Engine, image: np.ndarray) -> np.ndarray:
    return engine.sam_embedding(image).features.numpy()


def test_capture_does_not_change_masks(engine, engine_config, explanation, chelsea):
    plain = Engine(dataclasses.replace(engine_config, explanations=False))
    segments = plain.segment(chelsea, PROMPT, **THRESHOLDS)
    assert segments and len(segments) == len(explanation.segments)
    for ours, theirs in zip(explanation.segments, segments, strict=True):
        assert ours.label == theirs.label and ours.box == pytest.approx(theirs.box)
        # The capturing attention computes softmax explicitly where the plain one uses SDPA: the
        # same numbers up to float rounding, so at most a pixel sitting on the threshold may flip.
        assert np.count_nonzero(ours.mask != theirs.mask) <= max(1, ours.mask.size // 10_000)
        assert ours.predicted_iou == pytest.approx(theirs.predicted_iou, abs=1e-5)
    np.testing.assert_allclose(engine_features(plain, chelsea), engine_features(engine, chelsea), atol=1e-4)
    # Without capture nothing is pretended: no encoder maps, and the note says the decoder's are off.
    bare = plain.explain(chelsea, PROMPT, **THRESHOLDS)
    assert bare.encoder_received == {}
    assert any("EXPLANATIONS=0" in note for note in bare.notes)


def test_explanation_structure_and_math(engine, explanation, chelsea):
    encoder = engine.segmenter.sam.image_encoder
    grid = (encoder.img_size // encoder.patch_embed.proj.kernel_size[0],) * 2
    assert explanation.original_size == chelsea.shape[:2]
    assert max(explanation.input_size) == encoder.img_size
    # Every global-attention block of the encoder, no windowed one.
    global_blocks = [i for i, block in enumerate(encoder.blocks) if block.window_size == 0]
    assert sorted(explanation.encoder_received) == global_blocks
    for token_map in explanation.encoder_received.values():
        assert token_map.shape == grid
        assert token_map.min() >= 0 and token_map.sum() == pytest.approx(1.0, abs=1e-3)

    last_block = engine.sam_embedding(chelsea).attention.last_block
    assert last_block.block_index == global_blocks[-1] == len(encoder.blocks) - 1
    matrix = last_block.matrix[0].astype(np.float64)
    assert len(explanation.masks) == len(explanation.segments) > 0
    for segment, mask in zip(explanation.segments, explanation.masks, strict=True):
        # Decoder map: softmax over image tokens averaged over heads -> a distribution over the grid.
        assert mask.decoder_map.shape == grid
        assert mask.decoder_map.min() >= 0 and mask.decoder_map.sum() == pytest.approx(1.0, abs=1e-3)
        if not segment.mask.any():
            continue
        # "Where the mask looks" against a straightforward computation: coverage-weighted mean of rows,
        # the coverage of the mask in SAM's input frame (the resized image the tokens tile).
        patch = encoder.img_size // grid[0]
        in_frame = segment.mask_source.resized(*explanation.input_size)
        weights = sam_attention.mask_to_token_grid(in_frame, explanation.input_size, encoder.img_size, patch).ravel()
        reference = (weights @ matrix / weights.sum()).reshape(grid)
        np.testing.assert_allclose(mask.token_look[last_block.block_index], reference, rtol=1e-4, atol=1e-7)
        # The map the photo-sized mask's coverage (resized back into the frame) gives differs only where a
        # border crosses a token (the tiny model's masks are speckled: borders everywhere): < 0.5% of its mass.
        from_photo = sam_attention.mask_to_token_grid(segment.mask, explanation.input_size, encoder.img_size, patch)
        photo_map = (from_photo.ravel() @ matrix / from_photo.sum()).reshape(grid)
        assert np.abs(photo_map - reference).sum() <= 0.005


def test_received_map_counts_only_unpadded_queries(engine, explanation, chelsea):
    attention = engine.sam_embedding(chelsea).attention
    block = attention.last_block
    grid = block.grid
    patch = engine.segmenter.img_size // grid[0]
    rows = -(-explanation.input_size[0] // patch)
    cols = -(-explanation.input_size[1] // patch)
    assert (rows, cols) != grid, "chelsea is not square: part of SAM's input is padding"
    valid = np.zeros(grid, dtype=bool)
    valid[:rows, :cols] = True
    reference = block.matrix[0].astype(np.float64)[valid.ravel()].mean(axis=0).reshape(grid)
    np.testing.assert_allclose(explanation.encoder_received[block.block_index], reference, rtol=1e-4, atol=1e-7)


def test_grounding_scores_explain_the_label(explanation):
    for segment in explanation.segments:
        assert set(segment.phrase_scores) == {"cat", "dog"}
        assert segment.label == max(segment.phrase_scores, key=segment.phrase_scores.get)
        tokens = dict(segment.token_scores)
        # The label's score is its best token's score: the grounding bars show where it came from.
        assert tokens[segment.label] == pytest.approx(segment.phrase_scores[segment.label])


def test_cached_explanation_runs_no_model(engine, explanation, chelsea):
    dino_backbone = engine.detector.model.backbone
    decoder = engine.segmenter.sam.mask_decoder
    with counting_sam_encodes(engine.segmenter) as sam_encodes, counting_forwards(dino_backbone, decoder) as counts:
        again = engine.explain(chelsea, PROMPT, **THRESHOLDS)
        cached = engine.cached_explanation(chelsea, PROMPT, **THRESHOLDS)
        segments = engine.segment(chelsea, PROMPT, **THRESHOLDS)
    assert sam_encodes == [] and counts == [0, 0]
    assert again is explanation and cached is explanation
    assert [s.mask_source for s in segments] == [s.mask_source for s in explanation.segments]  # same objects
    assert engine.cached_explanation(chelsea, "a prompt never run", **THRESHOLDS) is None


def test_explain_and_tell_says_where_the_explanation_came_from(engine, explanation, chelsea):
    with counting_sam_encodes(engine.segmenter) as sam_encodes:
        again, cached = engine.explain_and_tell(chelsea, PROMPT, **THRESHOLDS)
    assert (again, cached, sam_encodes) == (explanation, True, [])
    fresh, cached = engine.explain_and_tell(chelsea, "kitten . whiskers", **THRESHOLDS)
    assert not cached and fresh is not explanation
    assert engine.explain_and_tell(chelsea, "kitten . whiskers", **THRESHOLDS) == (fresh, True)


def test_reprompt_reuses_both_image_encoders(engine, explanation, chelsea):
    dino_backbone = engine.detector.model.backbone
    with counting_sam_encodes(engine.segmenter) as sam_encodes, counting_forwards(dino_backbone) as counts:
        engine.explain(chelsea, "tabby . whiskers", **THRESHOLDS)
    assert sam_encodes == [] and counts == [0]


def test_render_is_rgb_at_working_sizes(explanation, chelsea):
    rendered = render_explanation(explanation, chelsea, encoder_side=512, mask_side=256)
    height, width = chelsea.shape[:2]  # 300 x 451: encoder maps at the image size, mask maps at 256 px
    assert [m.title for _, m in rendered.encoder][-1].endswith("last layer)")
    for _, heatmap in rendered.encoder:
        assert heatmap.heatmap.shape == heatmap.overlay.shape == (height, width, 3)
    mask_images = []
    for mask in rendered.masks:
        mask_images += [mask.decoder.heatmap, mask.decoder.overlay]
        mask_images += [img for _, h in mask.token_look for img in (h.heatmap, h.overlay)]
        assert mask.grounding and all(0 <= score <= 1 for _, score in mask.grounding)
    assert len(mask_images) == 4 * len(rendered.masks) > 0
    for image in mask_images:
        assert image.shape == (170, 256, 3) and image.dtype == np.uint8
    # The hottest decoder pixel is red in the jet colormap (R high, B low): RGB, not BGR.
    heat = rendered.masks[0].decoder.heatmap.astype(int)
    hottest = np.unravel_index(np.argmax(heat[..., 0] - heat[..., 2]), heat.shape[:2])
    assert heat[hottest][0] > 200 and heat[hottest][2] < 60
    with pytest.raises(ValueError, match="made for"):
        render_explanation(explanation, chelsea[:100])


def test_render_draws_maps_for_the_first_masks_only(explanation, chelsea):
    rendered = render_explanation(explanation, chelsea, mask_maps=1)
    assert rendered.masks[0].decoder is not None and rendered.masks[0].token_look
    assert len(rendered.masks) == len(explanation.segments) > 1
    assert all(m.decoder is None and m.token_look == [] and m.grounding for m in rendered.masks[1:])


def test_mobile_sam_explains_with_decoder_maps_only(tiny_cache, chelsea):
    engine = Engine(EngineConfig.from_file(tiny_cache / "engine-mobilesam.json"))
    explanation = engine.explain(chelsea, PROMPT, **THRESHOLDS)
    assert explanation.segments
    assert explanation.encoder_received == {}
    assert any("no global attention" in note for note in explanation.notes)
    for mask in explanation.masks:
        assert mask.token_look == {}
        assert mask.decoder_map.sum() == pytest.approx(1.0, abs=1e-3)
    rendered = render_explanation(explanation, chelsea)
    assert rendered.encoder == [] and len(rendered.masks) == len(explanation.segments)
