"""Prompts end to end: unicode captions, typed phrases no label matches, Label aliases, taxonomies
longer than Grounding DINO reads in one pass, and malformed prompt fields, through the real tiny
engine and the HTTP app (Flask's test client)."""

from __future__ import annotations

import base64
import io
import logging

import numpy as np
import pytest
from label_studio_sdk.converter import brush
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from backend._wsgi import ServerSettings, create_app
from backend.detector import Caption, PromptError
from backend.label_config import parse_label_config

TWO_LABELS = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
              '<Label value="cat"/><Label value="dog"/></BrushLabels>'
              '<TextArea name="prompt" toName="image"/><Number name="box_threshold" toName="image"/>'
              '<Number name="text_threshold" toName="image"/></View>')
ALIASED = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
           '<Label value="Animal" alias="ani"/><Label value="Car"/></BrushLabels>'
           '<TextArea name="prompt" toName="image"/></View>')


@pytest.fixture(scope="module")
def quick_engine(engine):
    """The session engine's models with at most 2 detections (SAM costs ~0.3 s a box on CPU)."""
    from backend.engine import Engine

    return Engine(engine.config.replace(max_detections=2), detector=engine.detector, segmenter=engine.segmenter)


@pytest.fixture
def client(quick_engine):
    return create_app(engine=quick_engine, settings=ServerSettings(load_on_start=False)).test_client()


def photo(seed: int, width: int = 96, height: int = 64) -> np.ndarray:
    import skimage.data

    cat = skimage.data.chelsea()
    y, x = (seed * 37) % (cat.shape[0] - height), (seed * 53) % (cat.shape[1] - width)
    return np.ascontiguousarray(cat[y:y + height, x:x + width])


def data_url(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# Both thresholds at 0 (Number controls in the context): every box counts, the detection cap decides.
LOW_THRESHOLDS = [{"from_name": name, "to_name": "image", "type": "number", "value": {"number": 0.0}}
                  for name in ("box_threshold", "text_threshold")]


def textarea(*texts) -> dict:
    return {"from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": list(texts)}}


def predict(client, rgb: np.ndarray, config: str, context=None, project="7.1700000000"):
    body = {"tasks": [{"id": 1, "data": {"image": data_url(rgb)}}], "project": project, "label_config": config,
            "params": {"context": context}}
    return client.post("/predict", json=body)


def brush_masks(entry: dict) -> list[tuple[str, np.ndarray]]:
    out = []
    for result in entry["result"]:
        if result["type"] == "brushlabels":
            flat = brush.decode_rle(result["value"]["rle"])
            mask = flat.reshape(result["original_height"], result["original_width"], 4)[:, :, 3] > 0
            out.append((result["value"]["brushlabels"][0], mask))
    return out


def expected_masks(engine, rgb, phrases, config: str, box_threshold=None,
                   text_threshold=None) -> list[tuple[str, np.ndarray]]:
    """What the engine finds for exactly ``phrases``, labelled as the config's BrushLabels store it."""
    target = parse_label_config(config).targets[0]
    segments = engine.segment(rgb, phrases, box_threshold, text_threshold)
    return [(target.labels_for(s.label)["mask"], s.mask) for s in segments if s.mask.any()]


def assert_same_masks(got, expected) -> None:
    assert [label for label, _ in got] == [label for label, _ in expected]
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert np.array_equal(a, b)


# -- item 13: unicode phrases -----------------------------------------------------------------------------
@pytest.mark.parametrize("phrases", [
    ["İstanbul", "cat"],  # "İ".lower() is two characters
    ["straße", "dog"], ["ΣΑΣ cat", "Ǆ dog"],  # case changes: ß, final sigma, titlecase digraphs
    ["🐱 cat", "dog 🐶"], ["e\u0301clair", "cafe\u0301 cat"],  # emoji, combining marks
    ["猫", "cat"], ["黒い 猫", "İİİ", "bird"],  # CJK, several length-changing characters in a row
])
def test_caption_gives_each_unicode_phrase_its_own_tokens(engine, phrases):
    tokenizer = engine.detector.tokenizer
    caption = Caption.build(phrases, tokenizer)
    for phrase, indices in zip(phrases, caption.phrase_tokens, strict=True):
        # The phrase's tokens in the caption are the tokens of the phrase alone: no shift from an
        # earlier phrase whose lower() changed its length.
        assert [caption.tokens[i] for i in indices] == tokenizer.tokenize(phrase.lower()), phrase


def test_label_starting_with_dotted_capital_i_is_scored_on_all_its_tokens(engine, chelsea):
    detections = engine.detect(chelsea, ["İstanbul", "cat"], box_threshold=0.0, text_threshold=0.0)
    assert detections and {d.label for d in detections} <= {"İstanbul", "cat"}
    tokens = engine.detector.tokenizer.tokenize("i̇stanbul") + ["cat"]
    assert all([t for t, _ in d.token_scores] == tokens for d in detections)


# -- item 11: typed phrases no label matches ----------------------------------------------------------------
def test_unknown_typed_phrase_is_dropped_before_detection_and_named(client, quick_engine, caplog):
    rgb = photo(1)
    with caplog.at_level(logging.WARNING, logger="backend"):
        response = predict(client, rgb, TWO_LABELS, context={"result": [textarea("zebra, cat"), *LOW_THRESHOLDS]})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["dropped_phrases"] == ["zebra"]
    assert "zebra" in caplog.text and "match no label" in caplog.text
    got = brush_masks(body["results"][0])
    assert got, "cat alone gets the whole detection cap: the tiny models find cats"
    assert_same_masks(got, expected_masks(quick_engine, rgb, ["cat"], TWO_LABELS, 0.0, 0.0))


def test_one_label_project_keeps_every_phrase(client, quick_engine):
    one_label = TWO_LABELS.replace('<Label value="dog"/>', "")
    rgb = photo(2)
    body = predict(client, rgb, one_label, context={"result": [textarea("zebra, cat"), *LOW_THRESHOLDS]}).get_json()
    assert "dropped_phrases" not in body
    got = brush_masks(body["results"][0])
    assert got and {label for label, _ in got} == {"cat"}
    assert_same_masks(got, expected_masks(quick_engine, rgb, ["zebra", "cat"], one_label, 0.0, 0.0))


def test_prompt_with_no_known_phrase_is_still_a_400(client):
    response = predict(client, photo(3), TWO_LABELS, context={"result": [textarea("zebra, horse")]})
    assert response.status_code == 400
    assert "unknown labels" in response.get_json()["error"] and "'cat', 'dog'" in response.get_json()["error"]


# -- item 10: <Label value=... alias=...> ---------------------------------------------------------------------
def test_aliased_label_is_prompted_by_value_and_stored_by_alias(client, quick_engine):
    rgb = photo(4)
    # No typed prompt: Grounding DINO reads the visible names; results carry what Label Studio stores.
    entry = predict(client, rgb, ALIASED).get_json()["results"][0]
    assert_same_masks(brush_masks(entry), expected_masks(quick_engine, rgb, ["Animal", "Car"], ALIASED))
    assert LabelInterface(ALIASED).validate_prediction(entry, return_errors=True) == []
    # A person may type either name.
    for typed in ("Animal", "ani", "animals"):
        response = predict(client, rgb, ALIASED, context={"result": [textarea(typed)]})
        assert response.status_code == 200, (typed, response.get_json())
        assert "dropped_phrases" not in response.get_json()
        got = brush_masks(response.get_json()["results"][0])
        assert got and {label for label, _ in got} == {"ani"}
        assert_same_masks(got, expected_masks(quick_engine, rgb, [typed], ALIASED))


def test_unknown_label_message_shows_value_and_alias(client):
    error = predict(client, photo(4), ALIASED, context={"result": [textarea("zebra")]}).get_json()["error"]
    assert "'Animal' (alias 'ani')" in error and "'Car'" in error


# -- item 9: big taxonomies, malformed fields --------------------------------------------------------------------
def test_thousand_label_config_predicts_in_several_passes(quick_engine):
    from backend.detector import GroundingDinoDetector
    from backend.engine import Engine

    # Every pass re-runs Grounding DINO's text half (~1 s on a busy CPU): short labels (two words the
    # tiny vocabulary knows, 3 tokens with the '.') and a small DINO input keep it to a dozen passes.
    detector = quick_engine.detector
    small = GroundingDinoDetector(detector.torch_model(), detector.device, detector.dtype, image_size=64, max_size=96)
    engine = Engine(quick_engine.config, detector=small, segmenter=quick_engine.segmenter)
    client = create_app(engine=engine, settings=ServerSettings(load_on_start=False)).test_client()
    words = sorted(w for w in detector.tokenizer.get_vocab() if w.isascii() and w.isalpha() and len(w) > 2)
    labels = [f"{a} {b}" for a in words for b in words if a != b][:1000]
    assert len(labels) == 1000 and len(Caption.split(labels, detector.tokenizer)) > 1
    config = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
              + "".join(f'<Label value="{label}"/>' for label in labels) + "</BrushLabels></View>")
    assert client.post("/setup", json={"project": "9.1", "schema": config}).status_code == 200
    rgb = photo(5)
    response = predict(client, rgb, config, project="9.1")
    assert response.status_code == 200
    body = response.get_json()
    assert "errors" not in body, body.get("errors")
    got = brush_masks(body["results"][0])
    assert got and {label for label, _ in got} <= set(labels)
    assert_same_masks(got, expected_masks(engine, rgb, labels, config))


@pytest.mark.parametrize("value", [5, {"a": 1}, ["cat", 5], True])
def test_textarea_text_of_the_wrong_type_is_a_400_naming_the_field(client, value):
    context = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": value}}]}
    response = predict(client, photo(6), TWO_LABELS, context=context)
    assert response.status_code == 400
    assert "context.result[0].value.text must be a string or a list of strings" in response.get_json()["error"]


def test_webhook_with_malformed_annotations_is_ignored_not_a_500(client):
    for body in ({"action": "ANNOTATION_CREATED", "project": 3, "annotations": 5},
                 {"action": "ANNOTATIONS_CREATED", "project": 3, "annotations": "x"},
                 {"action": "ANNOTATION_CREATED", "project": 3,
                  "annotation": {"result": [{"type": "textarea", "value": {"text": 5}}]}}):
        response = client.post("/webhook", json=body)
        assert response.status_code == 200, (body, response.get_json())
        assert response.get_json()["status"] == "ok" and "remembered_prompt" not in response.get_json()
    # The well-formed annotation next to a malformed list still counts.
    reply = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": 3, "annotations": 5,
                                          "annotation": {"result": [textarea("dog")]}}).get_json()
    assert reply["remembered_prompt"] == ["dog"]


def test_phrase_the_text_encoder_cannot_read_is_a_prompt_error(engine):
    with pytest.raises(PromptError, match="no tokens"):
        Caption.build(["\u0301", "cat"], engine.detector.tokenizer)


# -- label forms: separators inside a label, labels the text encoder can't read or can't fit -----------------
@pytest.mark.parametrize("phrases", [["St. Bernard", "cat"], ["a.b", "cat?"], ["dog", "what? cat. ok"]])
def test_separator_inside_a_label_is_part_of_its_phrase(engine, phrases):
    tokenizer = engine.detector.tokenizer
    caption = Caption.build(phrases, tokenizer)
    # Grounding DINO ends a phrase at '.' and '?': the caption has one per phrase, none inside one.
    assert [t for t in caption.tokens if t in (".", "?")] == ["."] * len(phrases)
    for phrase, indices in zip(phrases, caption.phrase_tokens, strict=True):
        words = [t for t in tokenizer.tokenize(phrase.lower()) if t not in (".", "?")]
        assert [caption.tokens[i] for i in indices] == words, phrase


def test_label_with_a_separator_is_detected_and_stored_by_its_name(client, quick_engine):
    config = TWO_LABELS.replace('value="dog"', 'value="St. Bernard"')
    rgb = photo(7)
    response = predict(client, rgb, config, context={"result": LOW_THRESHOLDS})
    assert response.status_code == 200, response.get_json()
    got = brush_masks(response.get_json()["results"][0])
    assert got and {label for label, _ in got} <= {"cat", "St. Bernard"}
    assert_same_masks(got, expected_masks(quick_engine, rgb, ["cat", "St. Bernard"], config, 0.0, 0.0))


@pytest.mark.parametrize("unreadable", ["...", "&#x301;", "?"])
def test_label_without_a_readable_word_is_dropped_not_a_failure_of_every_task(client, unreadable):
    config = TWO_LABELS.replace('value="cat"', f'value="{unreadable}"')
    body = {"tasks": [{"id": i, "data": {"image": data_url(photo(i))}} for i in (1, 2)], "project": "7.2",
            "label_config": config, "params": {"context": {"result": LOW_THRESHOLDS}}}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert "errors" not in body, body["errors"]
    assert len(body["dropped_phrases"]) == 1
    assert all(brush_masks(entry) and {label for label, _ in brush_masks(entry)} == {"dog"}
               for entry in body["results"])


def test_label_longer_than_one_pass_is_a_400_naming_the_limit(client):
    config = TWO_LABELS.replace('value="cat"', f'value="{" ".join(["cat"] * 300)}"')
    response = client.post("/setup", json={"project": "9.2", "schema": config})
    assert response.status_code == 400 and "256" in response.get_json()["error"]
    body = {"tasks": [{"id": i, "data": {"image": data_url(photo(i))}} for i in (1, 2)], "project": "9.3",
            "label_config": config}
    response = client.post("/predict", json=body)
    assert response.status_code == 400
    assert "300 tokens" in response.get_json()["error"] and "256" in response.get_json()["error"]


def test_a_few_long_labels_run_in_several_passes(client, quick_engine):
    labels = [" ".join([word] * 100) for word in ("cat", "dog", "bird")]  # 100 tokens each: two passes
    assert len(Caption.split(labels, quick_engine.detector.tokenizer)) == 2
    config = TWO_LABELS.replace('<Label value="cat"/><Label value="dog"/>',
                                "".join(f'<Label value="{label}"/>' for label in labels))
    rgb = photo(8, 48, 32)
    response = predict(client, rgb, config, context={"result": LOW_THRESHOLDS})
    assert response.status_code == 200 and "errors" not in response.get_json(), response.get_json()
    got = brush_masks(response.get_json()["results"][0])
    assert got
    assert_same_masks(got, expected_masks(quick_engine, rgb, labels, config, 0.0, 0.0))


@pytest.mark.parametrize("label, typed", [("St. Bernard", "St. Bernard"), ("cafe\u0301", "caf\u00e9"),
                                          ("a.b", "A.B, zebra")])
def test_typed_label_name_in_another_form_predicts_that_label(client, quick_engine, label, typed):
    config = TWO_LABELS.replace('value="dog"', f'value="{label}"')
    rgb = photo(9)
    response = predict(client, rgb, config, context={"result": [textarea(typed), *LOW_THRESHOLDS]})
    assert response.status_code == 200, response.get_json()
    got = brush_masks(response.get_json()["results"][0])
    assert got and {stored for stored, _ in got} == {label}  # exactly as the config writes it
    assert LabelInterface(config).validate_prediction(response.get_json()["results"][0], return_errors=True) == []
    assert_same_masks(got, expected_masks(quick_engine, rgb, [label], config, 0.0, 0.0))
