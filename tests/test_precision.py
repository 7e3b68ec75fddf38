"""Reduced precision (PRECISION=bf16/fp16, the GPU default) through the same code, run here on CPU.

CPU autocast runs the same bf16/fp16 code paths a GPU takes (autocast around the detector and SAM,
fp32 features out), so this catches dtype mismatches without a device; speed is the GPU's business.
"""

from __future__ import annotations

import platform
import sys

import numpy as np
import pytest
import torch

from backend.detector import Caption, parse_prompt


@pytest.fixture(scope="module", params=["bf16", "fp16"])
def reduced_engine(request, engine_config):
    from backend.engine import Engine

    return Engine(engine_config.replace(precision=request.param, device="cpu"))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_reduced_precision_sam_stays_close_to_fp32(engine, reduced_engine, chelsea):
    assert reduced_engine.segmenter.dtype in (torch.bfloat16, torch.float16)
    assert reduced_engine.describe()["dtype"] in ("bfloat16", "float16")
    # The engine's cached embedding (with attention capture, as in production): the tests below reuse
    # it, since fp16 convolutions on CPU run a slow fallback (~15 s here; GPUs have fp16 kernels).
    ours, fp32 = reduced_engine.sam_embedding(chelsea), engine.segmenter.embed(chelsea)
    assert ours.features.dtype == torch.float32  # the decoder and the caches always get fp32
    assert _cosine(ours.features, fp32.features) > 0.999
    # Same boxes through both: the masks agree (the bench prints this IoU for real-size models).
    height, width = chelsea.shape[:2]
    boxes = np.array([[0, 0, width, height], [width * 0.2, height * 0.1, width * 0.7, height * 0.9],
                      [width * 0.6, height * 0.5, width * 0.95, height * 0.8]], dtype=np.float32)
    decoded, decoded32 = reduced_engine.segmenter.segment(ours, boxes), engine.segmenter.segment(fp32, boxes)
    for low_res, low_res32 in zip(decoded.masks, decoded32.masks, strict=True):
        mask, mask32 = low_res.resized(height, width), low_res32.resized(height, width)
        assert np.logical_and(mask, mask32).sum() / max(np.logical_or(mask, mask32).sum(), 1) > 0.95
    assert np.abs(decoded.ious - decoded32.ious).max() < 0.02


def test_reduced_precision_engine_segments(reduced_engine, chelsea):
    # Grounding DINO's scores are not compared: random tiny weights saturate its logits, so bf16's
    # 8-bit mantissa reorders near-tied queries; bench/ reports the real-size IoU against fp32.
    caption = Caption.build(parse_prompt("cat . dog"), reduced_engine.detector.tokenizer)
    raw = reduced_engine.detector.raw_predictions(reduced_engine.detector.image_features(chelsea), caption)
    assert raw.token_probs.dtype == raw.boxes_cxcywh.dtype == torch.float32
    assert torch.isfinite(raw.token_probs).all()
    assert 0 <= float(raw.token_probs.min()) <= float(raw.token_probs.max()) <= 1
    segments = reduced_engine.segment(chelsea, "cat . dog", box_threshold=0.3, text_threshold=0.25)
    assert segments
    height, width = chelsea.shape[:2]
    for segment in segments:
        assert segment.mask.shape == (height, width) and segment.mask.dtype == bool
        assert segment.label in ("cat", "dog") and np.isfinite(segment.predicted_iou)


def test_reduced_precision_explanation_is_finite_and_normalised(reduced_engine, chelsea):
    explanation = reduced_engine.explain(chelsea, "cat . dog", box_threshold=0.2, text_threshold=0.2)
    assert explanation.segments
    assert explanation.encoder_received, "capture must work under autocast too"
    for received in explanation.encoder_received.values():
        assert np.isfinite(received).all() and received.min() >= 0
    assert len(explanation.masks) == len(explanation.segments)
    for mask in explanation.masks:
        # Softmax rows over the image tokens: each map is a distribution, in any precision.
        assert np.isfinite(mask.decoder_map).all() and mask.decoder_map.sum() == pytest.approx(1.0, abs=0.02)
        for look in mask.token_look.values():
            assert np.isfinite(look).all() and look.sum() == pytest.approx(1.0, abs=0.02)


# -- PRECISION=auto on CPU -----------------------------------------------------------------------------

# /proc/cpuinfo flags of the kinds of CPU the rule tells apart (abridged to what matters).
XEON_AMX = "fpu sse4_2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8"
EPYC_ZEN4 = "fpu sse4_2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 clzero"
SKYLAKE_AVX512 = "fpu sse4_2 avx avx2 avx512f avx512bw avx512_vnni"
AVX2_ONLY = "fpu sse4_2 avx avx2 fma f16c"


@pytest.mark.parametrize("flags, kind", [(XEON_AMX, "amx_bf16"), (EPYC_ZEN4, "avx512_bf16"),
                                         (SKYLAKE_AVX512, None), (AVX2_ONLY, None), ("", None)])
def test_auto_precision_is_bf16_only_where_the_cpu_has_native_bf16(flags, kind):
    from backend.models import cpu_bf16_kind, resolve_dtype, resolve_precision

    cpu = torch.device("cpu")
    assert cpu_bf16_kind(flags.split()) == kind
    assert resolve_precision("auto", cpu, flags.split()) == ("bf16" if kind else "fp32")
    # An explicit setting wins on every CPU: PRECISION=fp32 is the way back to fp32 on a bf16 CPU.
    assert resolve_dtype("fp32", cpu, flags.split()) is torch.float32
    assert resolve_dtype("bf16", cpu, flags.split()) is torch.bfloat16


def test_auto_precision_reads_this_machines_flags(engine_config):
    from backend.engine import model_version
    from backend.models import cpu_bf16_kind, cpu_flags, effective_precision

    flags = cpu_flags()
    if sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64"):
        assert {"sse2", "fpu"} <= flags, "flags must come from /proc/cpuinfo"
    auto = engine_config.replace(precision="auto", device="cpu")
    expected = "bf16" if cpu_bf16_kind(flags) else "fp32"
    assert effective_precision(auto) == expected
    assert model_version(auto) == model_version(auto.replace(precision=expected))


def test_bf16_masks_match_fp32_on_the_same_boxes(engine, chelsea, astronaut):
    """The IoU behind PRECISION=auto: SAM under bf16 autocast decodes the same boxes to masks with
    IoU >= 0.98 against fp32 (real-size random vit_b: ``python -m bench.precision``). The tiny random
    SAM's masks cover about half of each photo whatever the box, which helps the IoU; the bench's
    figure is the one on real-size models."""
    from backend.models import build_sam
    from bench.precision import same_box_iou

    # Loaded again: an engine on OpenVINO (RUNTIME=auto on CPU) frees its own SAM's torch encoder weights.
    iou = same_box_iou(build_sam(engine.config), torch.device("cpu"), [chelsea, astronaut])
    assert iou.boxes == 16
    assert iou.min >= 0.98, iou
