"""The engine on real photos with tiny random-weight models loaded through the production loaders."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch

from backend.cache import LruCache
from backend.detector import Caption, PromptError, parse_prompt, select_detections
from tests.sam_encodes import counting_sam_encodes


def _iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_segments_have_image_sized_masks_and_requested_labels(engine, chelsea):
    segments = engine.segment(chelsea, "cat . dog", box_threshold=0.3, text_threshold=0.25)
    assert segments, "random tiny models still score boxes above 0.3; nothing found means a broken pipeline"
    assert len(segments) <= engine.config.max_detections
    height, width = chelsea.shape[:2]
    for segment in segments:
        assert segment.mask.shape == (height, width) and segment.mask.dtype == bool
        assert segment.label in ("cat", "dog")
        x0, y0, x1, y1 = segment.box
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
        assert 0.3 < segment.score <= 1.0
        assert segment.score == pytest.approx(segment.phrase_scores[segment.label])
        assert np.isfinite(segment.predicted_iou)
    scores = [s.score for s in segments]
    assert scores == sorted(scores, reverse=True)


def test_caption_maps_subword_and_multiword_phrases_to_their_tokens(engine):
    caption = Caption.build(["minivan", "car taxi", "Cat"], engine.detector.tokenizer)
    assert caption.text == "minivan . car taxi . cat ."
    tokens = [[caption.tokens[i] for i in idx] for idx in caption.phrase_tokens]
    assert tokens == [["mini", "##van"], ["car", "taxi"], ["cat"]]
    assert caption.phrases == ("minivan", "car taxi", "Cat")  # labels keep the user's spelling


def test_phrase_scores_come_from_the_phrase_tokens_logits(engine, astronaut):
    phrases = ["minivan", "astronaut"]
    caption = Caption.build(phrases, engine.detector.tokenizer)
    raw = engine.detector.raw_predictions(engine.dino_features(astronaut), caption)
    detections = select_detections(raw, caption, astronaut.shape[:2], 0.0, 0.0, nms_iou=1.0, max_detections=1000)
    # Straightforward per-query reference: best phrase by max token probability among its tokens.
    expected = {}
    for q in range(raw.token_probs.shape[0]):
        per_phrase = [max(float(raw.token_probs[q, t]) for t in idx) for idx in caption.phrase_tokens]
        best = int(np.argmax(per_phrase))
        if per_phrase[best] > 0.0:
            expected[q] = (phrases[best], per_phrase[best])
    assert sorted((d.label, round(d.score, 5)) for d in detections) == sorted(
        (label, round(score, 5)) for label, score in expected.values())
    for d in detections:
        assert set(d.phrase_scores) == set(phrases)
        assert [t for t, _ in d.token_scores] == ["mini", "##van", "astronaut"]


def test_nms_per_label_and_detection_cap(engine, astronaut):
    phrases = ["astronaut", "rocket"]
    caption = Caption.build(phrases, engine.detector.tokenizer)
    raw = engine.detector.raw_predictions(engine.dino_features(astronaut), caption)
    everything = select_detections(raw, caption, astronaut.shape[:2], 0.0, 0.0, nms_iou=1.0, max_detections=1000)
    suppressed = select_detections(raw, caption, astronaut.shape[:2], 0.0, 0.0, nms_iou=0.3, max_detections=1000)
    assert len(everything) == raw.token_probs.shape[0]
    assert len(suppressed) < len(everything)
    for i, a in enumerate(suppressed):
        for b in suppressed[i + 1:]:
            if a.label == b.label:
                assert _iou(a.box, b.box) <= 0.3 + 1e-6
    # Greedy NMS reference per label: a box survives unless a better same-label survivor overlaps it.
    survivors = []
    for d in everything:  # already sorted by score
        if all(s.label != d.label or _iou(s.box, d.box) <= 0.3 for s in survivors):
            survivors.append(d)
    assert [(d.label, d.box) for d in suppressed] == [(d.label, d.box) for d in survivors]
    capped = select_detections(raw, caption, astronaut.shape[:2], 0.0, 0.0, nms_iou=0.3, max_detections=2)
    assert [d.box for d in capped] == [d.box for d in suppressed[:2]]


def test_sam_encodes_each_image_once(engine_config, astronaut, chelsea):
    from backend.engine import Engine

    engine = Engine(engine_config)  # fresh caches
    with counting_sam_encodes(engine.segmenter) as calls:
        first = engine.segment(astronaut, "astronaut . rocket . flag", box_threshold=0.2)
        assert len(first) > 1 and len(calls) == 1  # all boxes decoded from one encoding
        engine.segment(astronaut, "cat", box_threshold=0.2)  # re-prompt: embedding reused
        assert len(calls) == 1
        engine.segment(chelsea, "cat", box_threshold=0.2)
        assert calls == [engine.segmenter.encoder.name] * 2


def test_mobile_sam_variant_segments(tiny_cache, chelsea):
    from backend.config import EngineConfig
    from backend.engine import Engine

    engine = Engine(EngineConfig.from_file(tiny_cache / "engine-mobilesam.json"))
    assert type(engine.segmenter.sam.image_encoder).__name__ == "TinyViT"
    segments = engine.segment(chelsea, "cat", box_threshold=0.3)
    assert segments and all(s.mask.shape == chelsea.shape[:2] for s in segments)


@pytest.mark.parametrize("prompt", ["", " . . ", []])
def test_empty_prompt_is_refused(engine, chelsea, prompt):
    with pytest.raises(PromptError, match="empty"):
        engine.segment(chelsea, prompt)


def test_too_long_phrase_is_refused(engine, chelsea):
    with pytest.raises(PromptError, match="too long: 400 tokens"):
        engine.detect(chelsea, ["cat " * 400, "dog"])
    with pytest.raises(PromptError, match="too long"):
        Caption.build([f"cat{i}" for i in range(200)], engine.detector.tokenizer)  # one pass can't hold it


def test_prompt_longer_than_one_pass_runs_as_several_passes(engine, astronaut, monkeypatch):
    detector = engine.detector
    features = engine.dino_features(astronaut)
    phrases = ["astronaut", "rocket", "flag", "minivan", "cat", "red car", "helmet", "moon"]
    # A prompt that fits is one pass: exactly the single-caption selection.
    caption = Caption.build(phrases, detector.tokenizer)
    single = select_detections(detector.raw_predictions(features, caption), caption, astronaut.shape[:2],
                               0.0, 0.0, 0.5, 5)
    assert detector.detect(features, phrases, 0.0, 0.0, 0.5, 5) == single
    # Ten tokens per pass: [CLS] + phrases + their '.' + [SEP], in order, none lost or repeated.
    captions = Caption.split(phrases, detector.tokenizer, max_tokens=10)
    assert len(captions) > 2 and all(len(c.tokens) <= 10 for c in captions)
    assert [p for c in captions for p in c.phrases] == phrases
    # Each pass is the one-pass detection of its phrases; the passes merge by score under the cap.
    per_pass = [d for c in captions for d in detector.detect(features, list(c.phrases), 0.0, 0.0, 0.5, 5)]
    monkeypatch.setattr(detector, "max_text_tokens", 10)
    split = detector.detect(features, phrases, 0.0, 0.0, 0.5, 5)
    assert split == sorted(per_pass, key=lambda d: d.score, reverse=True)[:5]
    everything = detector.detect(features, phrases, 0.0, 0.0, 0.5, 1000)
    assert {i for i, c in enumerate(captions) for d in everything if d.label in c.phrases} == set(
        range(len(captions)))  # every pass contributed


def test_bad_thresholds_are_refused(engine, chelsea):
    with pytest.raises(ValueError, match="box_threshold"):
        engine.segment(chelsea, "cat", box_threshold=1.5)


def test_parse_prompt_dedupes_and_strips():
    assert parse_prompt(" Cat . dog .cat . hot  dog ") == ["Cat", "dog", "hot dog"]
    assert parse_prompt(["car", "Car", " van "]) == ["car", "van"]


def test_model_version_is_stable_and_tracks_settings(engine_config):
    from backend.engine import model_version

    assert model_version(engine_config) == model_version(engine_config)
    assert model_version(engine_config) != model_version(engine_config.replace(box_threshold=0.5))
    # "auto" is named by what it resolves to on this CPU (bf16 where it has native bf16, else fp32), so
    # the same outputs give the same version.
    from backend.models import resolve_precision

    here = resolve_precision("auto", torch.device("cpu"))
    assert model_version(engine_config.replace(precision="auto", device="cpu")) == model_version(
        engine_config.replace(precision=here, device="cpu"))
    assert model_version(engine_config.replace(precision="bf16")) != model_version(
        engine_config.replace(precision="fp32"))
    assert isinstance(model_version(engine_config), str)


def test_inference_uses_no_autograd(engine, chelsea):
    embedding = engine.sam_embedding(chelsea)
    assert not embedding.features.requires_grad
    assert torch.is_inference(embedding.features) or not embedding.features.requires_grad


def _concurrent_get_or_compute(outcome: Callable[[], int], callers: int) -> tuple[list, list[int], LruCache]:
    """Start one caller of a slow computation, then ``callers - 1`` more while it is pending."""
    from backend.engine import LruCache

    cache: LruCache[int] = LruCache(capacity=2)
    started, release, calls, outcomes = threading.Event(), threading.Event(), [], []

    def slow() -> int:
        calls.append(1)
        started.set()
        release.wait(10)
        return outcome()

    def call() -> None:
        try:
            outcomes.append(cache.get_or_compute("image", slow))
        except ValueError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=call) for _ in range(callers)]
    threads[0].start()
    assert started.wait(10)
    for t in threads[1:]:
        t.start()
    threading.Event().wait(0.2)  # let the waiters reach the pending computation
    release.set()
    for t in threads:
        t.join(10)
    return outcomes, calls, cache


def test_cache_computes_a_key_once_for_concurrent_callers():
    results, calls, cache = _concurrent_get_or_compute(lambda: 42, callers=4)
    assert results == [42] * 4 and len(calls) == 1
    assert cache.get_or_compute("image", lambda: 0) == 42


def test_cache_error_reaches_every_waiter_and_is_not_stored():
    def broken() -> int:
        raise ValueError("corrupt image")

    errors, calls, cache = _concurrent_get_or_compute(broken, callers=3)
    assert errors == ["corrupt image"] * 3 and len(calls) == 1
    assert cache.get("image") is None and cache.get_or_compute("image", lambda: 7) == 7


def test_concurrent_new_prompts_all_succeed(engine, chelsea):
    """16 threads, each with prompts nobody used before: the shared fast tokenizer must not raise
    'Already borrowed' (HF tokenizers are not thread-safe when their padding settings change)."""
    import time

    engine.dino_features(chelsea)  # the image half is cached: threads spend their time in the text half
    words = [f"thing{i} blue shiny object number {i} on the left" for i in range(40)]
    errors: list[BaseException] = []
    calls = [0]
    barrier = threading.Barrier(16)
    deadline = time.monotonic() + 6  # before the fix it fails within a few calls

    def work(worker: int) -> None:
        barrier.wait(10)
        n = 0
        while time.monotonic() < deadline and not errors:
            prompt = [f"w{worker} n{n} {w}" for w in words[n % 5::10]]  # distinct, ~100 tokens
            try:
                engine.detect(chelsea, prompt, box_threshold=0.99)
            except BaseException as exc:  # noqa: BLE001 - the assertion below shows it
                errors.append(exc)
            calls[0] += 1
            n += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, f"{len(errors)} of {calls[0]} calls failed: {errors[0]!r}"
    assert calls[0] >= 16


def test_a_threshold_change_reruns_no_text_half(engine, chelsea, monkeypatch):
    """Grounding DINO's scores for an image + caption are cached apart from the thresholds: moving a
    slider selects again from them, with the answer an engine computing everything anew gives."""
    from backend.engine import Engine

    def new_engine() -> Engine:  # the same models, empty caches
        return Engine(engine.config, detector=engine.detector, segmenter=engine.segmenter)

    runtime = engine.detector.text_runtime
    runs: list[int] = []
    run = runtime.run
    monkeypatch.setattr(runtime, "run", lambda inputs: runs.append(1) or run(inputs))
    sliding = new_engine()
    strict = sliding.segment(chelsea, "cat . dog", box_threshold=0.3, text_threshold=0.25)
    loose = sliding.segment(chelsea, "cat . dog", box_threshold=0.22, text_threshold=0.2)
    assert len(runs) == 1 and strict and len(loose) > len(strict)
    anew = new_engine().segment(chelsea, "cat . dog", box_threshold=0.22, text_threshold=0.2)
    assert len(runs) == 2
    assert [(s.label, s.box, s.score) for s in loose] == [(s.label, s.box, s.score) for s in anew]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(loose, anew, strict=True))
    sliding.segment(chelsea, "cat", box_threshold=0.3, text_threshold=0.25)  # another caption: the text half runs
    assert len(runs) == 3
