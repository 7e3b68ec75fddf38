"""Label config -> prompt, segments -> Label Studio results, per-project memory, and the model with
the real (tiny) engine."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from label_studio_sdk.converter import brush
from label_studio_sdk.label_interface import LabelInterface

from backend.detector import PromptError
from backend.engine_holder import EngineHolder
from backend.errors import BadRequest, EngineNotReady
from backend.label_config import LabelConfigError, TaskDataError, normalise_phrase, parse_label_config
from backend.ls_model import GroundedSamModel, ModelSettings
from backend.ls_results import prediction, segments_to_results
from backend.project_state import ProjectMemory, project_key
from backend.prompts import PromptInput, plan_prompt, read_context, read_extra_params, split_typed_prompt
from backend.types import Segment
from tests.test_fetch import data_url, png_bytes

TRACE_CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image"><Label value="cat"/>'
    '<Label value="dog"/></BrushLabels><TextArea name="prompt" toName="image" editable="true" rows="2" '
    'maxSubmissions="1" showSubmitButton="true"/></View>'
)
FULL_CONFIG = """
<View>
  <Image name="image" value="$img"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Cat"/>
    <Label value="Vehicle" predicted_values="car, truck"/>
  </BrushLabels>
  <RectangleLabels name="box" toName="image">
    <Label value="Cat"/>
    <Label value="Vehicle" predicted_values="car, truck"/>
  </RectangleLabels>
  <PolygonLabels name="outline" toName="image">
    <Label value="Vehicle" predicted_values="car, truck"/>
  </PolygonLabels>
  <TextArea name="prompt" toName="image"/>
  <Number name="box_threshold" toName="image"/>
</View>
"""
H, W = 40, 60


def decode_brush(result: dict) -> np.ndarray:
    """label-studio-sdk's decoder: RLE -> HxW mask at the result's original size."""
    flat = brush.decode_rle(result["value"]["rle"])
    return flat.reshape(result["original_height"], result["original_width"], 4)[:, :, 3] > 0


def box_segment(label: str, box: tuple[int, int, int, int], score: float = 0.8) -> Segment:
    x0, y0, x1, y1 = box
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return Segment(label=label, box=(float(x0), float(y0), float(x1), float(y1)), score=score, predicted_iou=0.9,
                   mask=mask, phrase_scores={label: score})


# -- label configs ------------------------------------------------------------------------------------
def test_trace_config_gives_brush_target_and_textarea():
    config = parse_label_config(TRACE_CONFIG)
    (target,) = config.targets
    assert (target.name, target.value) == ("image", "$image")
    (control,) = target.controls
    assert (control.name, control.kind, control.to_name, control.labels) == (
        "tag", "brushlabels", "image", ("cat", "dog"))
    assert config.textareas == ("prompt",)
    assert config.default_phrases() == ["cat", "dog"]
    assert target.image_url({"image": "/data/upload/1/x.png"}) == "/data/upload/1/x.png"
    with pytest.raises(TaskDataError, match="'image'"):
        target.image_url({"img": "x"})


def test_aliases_rectangles_and_polygons_share_the_image():
    config = parse_label_config(FULL_CONFIG)
    (target,) = config.targets
    assert [c.kind for c in target.controls] == ["brushlabels", "rectanglelabels", "polygonlabels"]
    # predicted_values replace the label name in the prompt
    assert config.default_phrases() == ["Cat", "car", "truck"]
    assert config.numbers == ("box_threshold",)
    assert config.brush_labels == ["Cat", "Vehicle"]


@pytest.mark.parametrize("config, message", [
    ("<View><Image name='i' value='$i'/>", "not valid XML"),
    ("", "empty"),
    ("<View><Image name='i' value='$i'/><RectangleLabels name='r' toName='i'><Label value='a'/>"
     "</RectangleLabels></View>",
     "no <BrushLabels>"),
    ("<View><Image name='i' value='$i'/><BrushLabels name='b' toName='i'></BrushLabels></View>", "no <Label"),
    ("<View><Text name='t' value='$t'/><BrushLabels name='b' toName='t'><Label value='a'/></BrushLabels></View>",
     "must point at an <Image>"),
])
def test_unusable_configs_say_what_is_wrong(config, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(config)


@pytest.mark.parametrize("phrase, expected", [
    ("cat", "Cat"), ("CAT", "Cat"), ("car", "Vehicle"), ("Truck", "Vehicle"),  # names and aliases
    ("a cat", "Cat"), ("cats", "Cat"), ("the trucks", "Vehicle"),  # articles and plurals
    ("red car", "Vehicle"), ("small fluffy cat", "Cat"),  # one label inside the phrase
    ("cat on a car", None), ("dog", None), ("vehicle", "Vehicle"),  # ambiguous / unknown / name
])
def test_phrases_map_to_labels(phrase, expected):
    brush_control = parse_label_config(FULL_CONFIG).targets[0].controls[0]
    assert brush_control.label_for(phrase) == expected


def test_unmatched_phrases_go_to_the_only_label_of_a_one_label_config():
    target = parse_label_config(FULL_CONFIG).targets[0]
    assert target.labels_for("cat") == {"mask": "Cat", "box": "Cat"}  # no Cat in the polygon control
    assert target.labels_for("a red truck") == {"mask": "Vehicle", "box": "Vehicle", "outline": "Vehicle"}
    assert target.labels_for("bird") == {}  # two labels: skipped
    single = parse_label_config(FULL_CONFIG.replace('<Label value="Cat"/>', ""))
    assert single.targets[0].labels_for("bird") == {"mask": "Vehicle", "box": "Vehicle", "outline": "Vehicle"}
    assert normalise_phrase("  The  Red Buses ") == "red bus"


# -- prompts -------------------------------------------------------------------------------------------
def test_typed_prompts_split_on_dots_commas_and_lines():
    assert split_typed_prompt("cat, dog. red car\ntruck;") == ["cat", "dog", "red car", "truck"]
    assert split_typed_prompt(["a cat", "Cat , bird"]) == ["a cat", "Cat", "bird"]
    with pytest.raises(PromptError):
        split_typed_prompt(" , . ")


def test_context_reads_every_textarea_and_threshold_numbers():
    context = {"result": [
        {"from_name": "prompt", "type": "textarea", "value": {"text": ["a cat"]}},
        {"from_name": "other", "type": "textarea", "value": {"text": ["truck, car"]}},
        {"from_name": "box_threshold", "type": "number", "value": {"number": 0.45}},
        {"from_name": "tag", "type": "keypointlabels", "value": {"x": 1}},
    ]}
    given = read_context(context)
    assert given.phrases == ("a cat", "truck", "car")
    assert (given.box_threshold, given.text_threshold) == (0.45, None)
    assert read_context(None).empty and read_context({"result": []}).empty
    with pytest.raises(PromptError, match="TextArea prompt is empty"):
        read_context({"result": [{"type": "textarea", "value": {"text": ["  "]}}]})
    with pytest.raises(BadRequest, match="box_threshold"):
        read_context({"result": [{"from_name": "box_threshold", "type": "number", "value": {"number": 3}}]})
    with pytest.raises(BadRequest, match="context"):
        read_context(["not", "an", "object"])


def test_extra_params():
    assert read_extra_params(None).empty
    given = read_extra_params('{"prompt": "car . truck", "box_threshold": 0.5, "color": "red"}')
    assert (given.phrases, given.box_threshold) == (("car", "truck"), 0.5)
    assert read_extra_params({"prompt": ["cat", "dog"]}).phrases == ("cat", "dog")
    for bad in ("{not json", ["list"], {"prompt": 3}, {"text_threshold": "high"}, {"box_threshold": -1}):
        with pytest.raises(BadRequest):
            read_extra_params(bad)


def test_prompt_precedence():
    config = parse_label_config(TRACE_CONFIG)
    context, remembered = PromptInput(("a cat",), 0.4), PromptInput(("dog",), None, 0.2)
    extra, env = PromptInput(("bird",), 0.6, 0.3), ("horse",)
    assert plan_prompt(config, context, remembered, extra, env) == plan_prompt(config, context, remembered, extra, env)
    plan = plan_prompt(config, context, remembered, extra, env)
    assert (plan.phrases, plan.source, plan.box_threshold, plan.text_threshold) == (("a cat",), "context", 0.4, 0.2)
    assert plan_prompt(config, PromptInput(), remembered, extra, env).source == "project"
    assert plan_prompt(config, PromptInput(), PromptInput(), extra, env).phrases == ("bird",)
    assert plan_prompt(config, PromptInput(), PromptInput(), PromptInput(), env).source == "env"
    plan = plan_prompt(config, PromptInput())
    assert (plan.phrases, plan.source, plan.box_threshold) == (("cat", "dog"), "labels", None)


# -- results ---------------------------------------------------------------------------------------------
def test_each_segment_is_made_full_size_once_for_all_its_results():
    """A segment's photo-sized mask is made once, however many controls (brush, rectangle, polygon) read it,
    and the empty check reads that same mask: at 12 MP each making costs ~45 ms."""
    from backend.types import DenseMask

    class CountingMask(DenseMask):
        """Counts full-size makings; its area, like SAM's masks' (SamMaskLogits.area), makes one."""

        made = 0

        def resized(self, height: int, width: int) -> np.ndarray:
            CountingMask.made += 1
            return super().resized(height, width)

        @property
        def area(self) -> int:
            return int(np.count_nonzero(self.resized(*self.size)))

    target = parse_label_config(FULL_CONFIG).targets[0]
    bits = np.zeros((H, W), bool)
    bits[5:25, 10:30] = True
    car = Segment(label="car", box=(10.0, 5.0, 30.0, 25.0), score=0.9, predicted_iou=0.9, mask=CountingMask(bits))
    empty = Segment(label="car", box=(1.0, 1.0, 4.0, 4.0), score=0.4, predicted_iou=0.1,
                    mask=CountingMask(np.zeros((H, W), bool)))
    results, _ = segments_to_results([car, empty], target, W, H)
    assert sorted(result["type"] for result in results) == ["brushlabels", "polygonlabels", "rectanglelabels"]
    assert CountingMask.made == 2  # one per segment, the empty one included (it is skipped after)


def test_brush_rectangle_and_polygon_results():
    target = parse_label_config(FULL_CONFIG).targets[0]
    car = box_segment("red car", (10, 5, 30, 25), score=0.9)
    cat = box_segment("cat", (35, 10, 55, 30), score=0.5)
    results, scores = segments_to_results([car, cat], target, W, H)
    by_type = {}
    for result in results:
        by_type.setdefault(result["type"], []).append(result)
        assert set(result) >= {"id", "from_name", "to_name", "type", "original_width", "original_height",
                               "image_rotation", "value", "score", "readonly"}
        assert (result["original_width"], result["original_height"], result["image_rotation"]) == (W, H, 0)
        assert result["readonly"] is False
    assert len({r["id"] for r in results}) == len(results)
    masks = by_type["brushlabels"]
    assert [m["value"]["brushlabels"] for m in masks] == [["Vehicle"], ["Cat"]]
    assert all(m["value"]["format"] == "rle" and m["from_name"] == "mask" for m in masks)
    np.testing.assert_array_equal(decode_brush(masks[0]), car.mask)
    np.testing.assert_array_equal(decode_brush(masks[1]), cat.mask)
    rect = by_type["rectanglelabels"][0]["value"]
    assert rect["rectanglelabels"] == ["Vehicle"]
    assert rect["x"] == pytest.approx(10 / W * 100) and rect["width"] == pytest.approx(20 / W * 100)
    assert rect["y"] == pytest.approx(5 / H * 100) and rect["height"] == pytest.approx(20 / H * 100)
    (polygon,) = by_type["polygonlabels"]  # the polygon control has no Cat label
    points = np.array(polygon["value"]["points"])
    assert polygon["value"]["closed"] is True and len(points) >= 3
    assert points[:, 0].min() == pytest.approx(10 / W * 100) and points[:, 0].max() == pytest.approx(29 / W * 100)
    assert points[:, 1].min() == pytest.approx(5 / H * 100) and points[:, 1].max() == pytest.approx(24 / H * 100)
    assert scores == [0.9, 0.5]
    entry = prediction(results, scores, "v1")
    assert entry["score"] == pytest.approx(0.7) and entry["model_version"] == "v1"
    # Label Studio (LabelInterface, as LS 1.23 validates predictions) accepts every result.
    interface = LabelInterface(FULL_CONFIG.replace('value="$img"', 'value="$image"'))
    assert interface.validate_prediction({"result": results}, return_errors=True) == []


def test_unmatched_phrases_and_empty_masks_are_skipped():
    target = parse_label_config(TRACE_CONFIG).targets[0]
    bird = box_segment("bird", (0, 0, 10, 10))
    empty = Segment("cat", (0, 0, 5, 5), 0.9, 0.1, np.zeros((H, W), bool))
    results, scores = segments_to_results([bird, empty], target, W, H)
    assert results == [] and scores == []
    assert prediction([], [], "v") == {"result": [], "score": 0.0, "model_version": "v"}


# -- per-project memory --------------------------------------------------------------------------------------
def test_project_keys_and_memory_is_thread_safe_and_small():
    assert project_key("1.1795569439") == "1" and project_key(12) == "12" and project_key({"id": 3}) == "3"
    assert project_key(None) is None
    with pytest.raises(BadRequest):
        project_key(["1"])
    memory = ProjectMemory(capacity=50)

    def worker(n: int) -> None:
        for i in range(200):
            memory.update(str(i % 60), remembered=PromptInput((f"p{n}-{i}",)))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(memory._states) == 50
    assert memory.get("unknown").remembered.empty


# -- the model with the real engine -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_engine(engine):
    """The session engine's models with at most 2 detections (SAM costs ~0.3 s a box on CPU)."""
    from backend.engine import Engine

    return Engine(engine.config.replace(max_detections=2), detector=engine.detector, segmenter=engine.segmenter)


def test_model_predicts_every_control_with_the_real_engine(quick_engine):
    model = GroundedSamModel(EngineHolder(quick_engine), ModelSettings())
    tasks = [{"id": 1, "data": {"img": data_url(png_bytes(80, 60, seed=4))}}, {"id": 2, "data": {}}]
    outcome = model.predict(tasks, "5.1700000000", FULL_CONFIG, context=None)
    assert outcome.plan.phrases == ("Cat", "car", "truck") and outcome.plan.source == "labels"
    good, bad = outcome.results
    assert good["model_version"] == bad["model_version"] == quick_engine.model_version
    assert bad == {"error": outcome.errors[0]["error"], "model_version": quick_engine.model_version}
    assert outcome.errors == [{"task": 2, "error": outcome.errors[0]["error"]}]
    assert "'img'" in outcome.errors[0]["error"]
    assert good["result"], "random tiny models always find something at the default thresholds"
    kinds = {r["type"] for r in good["result"]}
    assert {"brushlabels", "rectanglelabels"} <= kinds
    for result in good["result"]:
        assert (result["original_width"], result["original_height"]) == (80, 60)
        if result["type"] == "brushlabels":
            assert decode_brush(result).shape == (60, 80)
            assert result["value"]["brushlabels"][0] in ("Cat", "Vehicle")
    interface = LabelInterface(FULL_CONFIG.replace('value="$img"', 'value="$image"'))
    assert interface.validate_prediction(good, return_errors=True) == []
    assert good["score"] == pytest.approx(np.mean([r["score"] for r in good["result"] if r["type"] == "brushlabels"]),
                                          abs=1e-3)


def test_engine_holder_reports_missing_weights(tmp_path, engine_config):
    holder = EngineHolder(config_loader=lambda: engine_config.replace(cache_dir=tmp_path))
    holder.start()
    with pytest.raises(EngineNotReady) as info:
        holder.get(timeout=60)
    status, reason = holder.status()
    assert status == "not ready" and reason == str(info.value)
    assert "tiny_sam_vit_b.pth" in reason
    assert holder.model_version.startswith("grounded-sam-")


# -- batches: images of the next tasks are fetched while the model works -------------------------------
def test_read_ahead_keeps_order_and_hands_each_failure_to_its_item():
    from backend.ls_model import read_ahead

    def load(item: int) -> int:
        if item % 3 == 1:
            raise ValueError(f"item {item} is bad")
        return item * 10

    for ahead in (0, 1, 2, 5):
        outcomes = []
        for future in read_ahead(list(range(7)), load, ahead):
            try:
                outcomes.append(future.result(timeout=10))
            except ValueError as exc:
                outcomes.append(str(exc))
        assert outcomes == [0, "item 1 is bad", 20, 30, "item 4 is bad", 50, 60], ahead


def test_read_ahead_overlaps_the_consumer_and_stays_bounded():
    from backend.ls_model import read_ahead

    started: list[int] = []
    second_started = threading.Event()

    def load(item: int) -> int:
        started.append(item)
        if item == 1:
            second_started.set()
        return item

    ahead = 2
    for index, future in enumerate(read_ahead(list(range(8)), load, ahead)):
        assert future.result(timeout=10) == index
        if index == 0:
            # While the consumer still works on the first item, the next one is being loaded.
            assert second_started.wait(timeout=10)
        # Never more than `ahead` items loaded beyond the one being consumed.
        assert max(started) <= index + ahead, (index, started)
    assert sorted(started) == list(range(8))


@pytest.mark.parametrize("value, message", [("-1", "PREFETCH_TASKS must be >= 0"),
                                            ("two", "PREFETCH_TASKS must be a whole number")])
def test_prefetch_setting_is_validated(value, message):
    assert ModelSettings.from_env({}).prefetch_tasks == 2
    assert ModelSettings.from_env({"PREFETCH_TASKS": "0"}).prefetch_tasks == 0
    with pytest.raises(ValueError, match=message):
        ModelSettings.from_env({"PREFETCH_TASKS": value})
