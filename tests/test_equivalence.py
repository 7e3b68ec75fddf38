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


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def test_detector_outputs_equal_groundingdino_forward(engine, photo_path):
    from groundingdino.util.inference import load_image, preprocess_caption

    from backend.detector import Caption

    image, tensor = load_image(str(photo_path))
    caption = Caption.build(["cat", "dog"], engine.detector.tokenizer)
    assert caption.text == preprocess_caption(PROMPT).replace("dog.", "dog .")
    with torch.no_grad():
        reference = engine.detector.model(tensor[None], captions=[preprocess_caption(PROMPT)])
    ours = engine.detector.raw_predictions(engine.detector.image_features(image), caption)
    n_tokens = len(caption.tokens)
    torch.testing.assert_close(ours.token_probs[:, :n_tokens], reference["pred_logits"][0, :, :n_tokens].sigmoid(),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.boxes_cxcywh, reference["pred_boxes"][0], atol=1e-5, rtol=1e-4)


def test_engine_masks_equal_reference_chain(engine, reference_sam, photo_path):
    from groundingdino.util.inference import load_image, predict
    from segment_anything import SamPredictor
    from torchvision.ops import box_convert

    image, tensor = load_image(str(photo_path))
    ref_boxes, ref_scores, ref_phrases = predict(engine.detector.model, tensor, PROMPT, BOX_THRESHOLD,
                                                 TEXT_THRESHOLD, device="cpu")
    height, width = image.shape[:2]
    ref_xyxy = box_convert(ref_boxes * torch.tensor([width, height, width, height]), "cxcywh", "xyxy")
    ref_xyxy[:, 0::2] = ref_xyxy[:, 0::2].clamp(0, width)  # we clip boxes to the image
    ref_xyxy[:, 1::2] = ref_xyxy[:, 1::2].clamp(0, height)

    segments = engine.segment(image, PROMPT, BOX_THRESHOLD, TEXT_THRESHOLD)
    assert segments
    predictor = SamPredictor(reference_sam)
    predictor.set_image(image)
    for segment in segments:
        # Our kept boxes are a subset of the reference's (best phrase > threshold implies any token is).
        distances = (ref_xyxy - torch.tensor(segment.box)).abs().max(dim=1).values
        match = int(distances.argmin())
        assert float(distances[match]) < 0.5, f"box {segment.box} not among the reference boxes"
        # The reference names merged token strings; ours is the requested phrase those tokens belong to.
        assert ref_phrases[match] == "" or segment.label in ref_phrases[match].split()
        ref_masks, ref_ious, _ = predictor.predict_torch(
            point_coords=None, point_labels=None,
            boxes=predictor.transform.apply_boxes_torch(torch.tensor([segment.box]), image.shape[:2]),
            multimask_output=False,
        )
        assert _mask_iou(segment.mask, ref_masks[0, 0].numpy()) >= 0.99
        assert segment.predicted_iou == pytest.approx(float(ref_ious[0, 0]), abs=1e-4)
