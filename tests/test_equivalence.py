"""Same random weights, same photo: the engine equals the reference chain the existing backends run
(groundingdino.util.inference.predict + segment_anything's SamPredictor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_models import TINY_SAM_ARCH

PROMPT = "cat . dog"
# Random weights rarely score the phrase tokens high at 800 px; low thresholds keep a few boxes to compare.
BOX_THRESHOLD, TEXT_THRESHOLD = 0.05, 0.05


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory, chelsea):
    path = tmp_path_factory.mktemp("photos") / "chelsea.png"
    Image.fromarray(chelsea).save(path)
    return path


@pytest.fixture(scope="module")
def engine(engine_config):
    """At the production input size: the reference's load_image always resizes to 800 (max 1333)."""
    from backend.engine import Engine

    return Engine(engine_config.replace(dino_image_size=800, dino_max_size=1333))


@pytest.fixture(scope="module")
def reference_sam(tiny_cache):
    """SAM built and loaded by segment_anything's own code, not ours."""
    from segment_anything.build_sam import _build_sam

    return _build_sam(checkpoint=str(tiny_cache / "tiny_sam_vit_b.pth"), **TINY_SAM_ARCH).eval()


@pytest.fixture(scope="module")
def reference_dino(engine_config):
    """The same Grounding DINO file, without the engine's inference speed-ups (stock groundingdino forward)."""
    from backend.models import build_grounding_dino

    return build_grounding_dino(engine_config)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def test_detector_outputs_equal_groundingdino_forward(engine, reference_dino, photo_path):
    from groundingdino.util.inference import load_image, preprocess_caption

    from backend.detector import Caption

    image, tensor = load_image(str(photo_path))
    caption = Caption.build(["cat", "dog"], engine.detector.tokenizer)
    assert caption.text == preprocess_caption(PROMPT).replace("dog.", "dog .")
    with torch.no_grad():
        reference = reference_dino(tensor[None], captions=[preprocess_caption(PROMPT)])
    ours = engine.detector.raw_predictions(engine.detector.image_features(image), caption)
    n_tokens = len(caption.tokens)
    torch.testing.assert_close(ours.token_probs[:, :n_tokens], reference["pred_logits"][0, :, :n_tokens].sigmoid(),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.boxes_cxcywh, reference["pred_boxes"][0], atol=1e-5, rtol=1e-4)


def test_engine_masks_equal_reference_chain(engine, reference_dino, reference_sam, photo_path):
    from groundingdino.util.inference import load_image, predict
    from segment_anything import SamPredictor
    from torchvision.ops import box_convert

    image, tensor = load_image(str(photo_path))
    ref_boxes, ref_scores, ref_phrases = predict(reference_dino, tensor, PROMPT, BOX_THRESHOLD, TEXT_THRESHOLD,
                                                 device="cpu")
    height, width = image.shape[:2]
    ref_xyxy = box_convert(ref_boxes * torch.tensor([width, height, width, height]), "cxcywh", "xyxy")
    ref_clipped = ref_xyxy.clone()
    ref_clipped[:, 0::2] = ref_clipped[:, 0::2].clamp(0, width)
    ref_clipped[:, 1::2] = ref_clipped[:, 1::2].clamp(0, height)

    segments = engine.segment(image, PROMPT, BOX_THRESHOLD, TEXT_THRESHOLD)
    assert segments
    predictor = SamPredictor(reference_sam)
    predictor.set_image(image)
    for segment in segments:
        # Our kept boxes are a subset of the reference's (best phrase > threshold implies any token is);
        # ours are clipped to the image for display, SAM gets the box as the reference passes it.
        distances = (ref_clipped - torch.tensor(segment.box)).abs().max(dim=1).values
        match = int(distances.argmin())
        assert float(distances[match]) < 0.5, f"box {segment.box} not among the reference boxes"
        # The reference names merged token strings; ours is the requested phrase those tokens belong to.
        assert ref_phrases[match] == "" or segment.label in ref_phrases[match].split()
        ref_masks, ref_ious, _ = predictor.predict_torch(
            point_coords=None, point_labels=None,
            boxes=predictor.transform.apply_boxes_torch(ref_xyxy[match:match + 1], image.shape[:2]),
            multimask_output=False,
        )
        assert _mask_iou(segment.mask, ref_masks[0, 0].numpy()) >= 0.99
        assert segment.predicted_iou == pytest.approx(float(ref_ious[0, 0]), abs=1e-4)


def test_some_reference_box_reaches_past_the_image(engine, photo_path):
    """The comparison above covers unclipped SAM prompts only if some kept box leaves the image."""
    from groundingdino.util.inference import load_image

    image, _ = load_image(str(photo_path))
    detections = engine.detect(image, ["cat", "dog"], BOX_THRESHOLD, TEXT_THRESHOLD)
    assert any(d.sam_box != d.box for d in detections)
    for d in detections:
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 <= x1 <= image.shape[1] and 0 <= y0 <= y1 <= image.shape[0]
