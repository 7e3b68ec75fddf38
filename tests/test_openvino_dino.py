"""RUNTIME=openvino for Grounding DINO's text half: one torch.export graph with dynamic image and prompt
sizes, converted once, cached on disk, and checked against the torch runtime on the same image features
(tiny random-weight models, real architectures)."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from torchvision.ops import box_convert, box_iou

from backend.config import EngineConfig
from backend.detector import Caption, GroundingDinoDetector, prepare
from backend.dino_fast import FastDeformableAttention
from backend.dino_runtime import OpenVinoDinoText, TorchDinoText, build_dino_text_runtime
from backend.engine import Engine
from backend.models import build_grounding_dino
from backend.weights import file_sha256
from tests.sam_encodes import forbid_conversion

CPU = torch.device("cpu")
SHORT = ["cat", "dog"]
# About 60 tokens: a prompt of another length, with multi-token phrases (sub-sentence masks, position ids).
LONG = ["a person in a space suit", "flag", "rocket engine", "minivan", "car taxi", "striped tabby cat",
        "red brick wall", "window frame", "wooden table", "coffee cup", "american flag on a pole",
        "helmet visor reflection", "glove", "white boots"]


def detector_for(config: EngineConfig, dtype: torch.dtype = torch.float32) -> GroundingDinoDetector:
    """A fresh Grounding DINO from the checkpoint with the text runtime the config asks for (as Engine builds it)."""
    model = prepare(build_grounding_dino(config), CPU)
    return GroundingDinoDetector(model, CPU, dtype, config.dino_image_size, config.dino_max_size,
                                 build_dino_text_runtime(config, model, CPU, dtype))


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino_cache")


@pytest.fixture(scope="module")
def config(tiny_cache, ov_cache) -> EngineConfig:
    return EngineConfig.from_file(tiny_cache / "engine.json", runtime="openvino", openvino_cache_dir=ov_cache,
                                  precision="fp32")


@pytest.fixture(scope="module")
def first_load(config) -> GroundingDinoDetector:
    """The first load: converts into the empty cache folder."""
    return detector_for(config)


@pytest.fixture(scope="module")
def torch_detector(config) -> GroundingDinoDetector:
    return detector_for(config.replace(runtime="torch"))


@pytest.fixture(scope="module")
def images(chelsea, astronaut) -> dict[str, np.ndarray]:
    """Landscape, square, portrait and a wide strip: four feature-map shapes."""
    return {"landscape": chelsea, "square": astronaut, "portrait": np.ascontiguousarray(chelsea.transpose(1, 0, 2)),
            "strip": np.ascontiguousarray(astronaut[200:280])}


def features_at(detector: GroundingDinoDetector, image: np.ndarray, side: int):
    """``detector``'s image features with the image resized to ``side`` px (long side <= side * 1333 / 800)."""
    resized = GroundingDinoDetector(detector.model, CPU, detector.dtype, side, side * 1333 // 800,
                                    detector.text_runtime)
    return resized.image_features(image)


def _assert_same_predictions(ours, theirs, atol: float = 1e-5) -> None:
    assert ours.token_probs.shape == theirs.token_probs.shape and ours.boxes_cxcywh.shape == theirs.boxes_cxcywh.shape
    torch.testing.assert_close(ours.token_probs, theirs.token_probs, atol=atol, rtol=1e-4)
    torch.testing.assert_close(ours.boxes_cxcywh, theirs.boxes_cxcywh, atol=atol, rtol=1e-4)


def test_first_load_converts_and_caches_by_checkpoint(first_load, torch_detector, config, ov_cache):
    runtime = first_load.text_runtime
    assert isinstance(runtime, OpenVinoDinoText) and runtime.precision == "f32"
    # The deformable attention is the operations library's node (this machine has a compiler).
    # (Built in ov_cache/ops, or reused from the folder of an engine built earlier in this process.)
    assert runtime.core == "fused" and runtime.ops is not None and runtime.ops.path.is_file()
    assert '"form": "fused+fusion_softmax"' in runtime.conversion.path.with_suffix(".json").read_text()
    import openvino as ov

    graph = runtime.ops.add_to(ov.Core()).read_model(runtime.conversion.path)
    kinds = [node.get_type_name() for node in graph.get_ops()]
    layers = sum(isinstance(module, FastDeformableAttention) for module in torch_detector.torch_model().modules())
    assert layers >= 2 and kinds.count("DeformableAttention") == layers and "GridSample" not in kinds
    assert kinds.count("FusionSoftmax") == len(first_load.model.transformer.encoder.layers)
    conversion = runtime.conversion
    assert conversion.converted and conversion.path is not None and conversion.path.parent == ov_cache
    assert conversion.path.name.startswith("dino-swint_ogc-text-f32-")
    assert conversion.size_bytes == conversion.path.stat().st_size + conversion.path.with_suffix(".bin").stat().st_size
    assert file_sha256(config.dino_checkpoint_path) in conversion.path.with_suffix(".json").read_text()


def test_one_conversion_serves_every_aspect_ratio_and_prompt_length(first_load, torch_detector, images, ov_cache,
                                                                    monkeypatch):
    forbid_conversion(monkeypatch, "a new image or prompt size must not export or convert again")
    level_shapes, token_counts = set(), set()
    # The tiny config's 320 px, and the production 800 px, where level 1 of the square photo is 50
    # tokens high and a proposal's centre lands exactly on groundingdino's 0.99 bound.
    for name, side in [(name, 320) for name in images] + [("square", 800), ("landscape", 800)]:
        features = features_at(torch_detector, images[name], side)
        level_shapes.add(tuple(tuple(src.shape[2:]) for src in features.srcs))
        for phrases in (SHORT, LONG):
            caption = Caption.build(phrases, torch_detector.tokenizer)
            token_counts.add(len(caption.tokens))
            _assert_same_predictions(first_load.raw_predictions(features, caption),
                                     torch_detector.raw_predictions(features, caption))
    assert len(level_shapes) == len(images) + 2 and len(token_counts) == 2
    # One graph on disk for all of them.
    assert len(list(ov_cache.glob("dino-*.xml"))) == 1


@pytest.mark.parametrize("sides", [[(100, 151), (50, 76), (25, 38), (13, 19)], [(50, 50), (25, 25), (13, 13), (7, 7)],
                                   [(12, 200), (6, 100), (3, 50), (2, 25)]])
def test_proposals_equal_groundingdino_at_the_bounds(sides):
    """dino_graph's integer in-bounds test is groundingdino's float one, at sizes whose centres land on
    0.01 and 0.99 exactly (n = 50, 100), with and without padding."""
    from groundingdino.models.GroundingDINO.utils import gen_encoder_output_proposals

    from backend.dino_graph import _proposals

    tokens = sum(h * w for h, w in sides)
    memory = torch.randn(2, tokens, 8)
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in sides]
    for mask in masks:  # the second image padded on the right and bottom
        mask[1, mask.shape[1] * 3 // 4:] = True
        mask[1, :, mask.shape[2] * 2 // 3:] = True
    padding = torch.cat([m.flatten(1) for m in masks], 1)
    theirs = gen_encoder_output_proposals(memory, padding, torch.tensor(sides))
    ours = _proposals(memory, padding, sides)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_warm_start_reads_the_cache_and_never_converts(first_load, config, images, monkeypatch):
    forbid_conversion(monkeypatch, "a warm start must not export or convert")
    path = first_load.text_runtime.conversion.path
    written = path.stat().st_mtime_ns
    warm = detector_for(config)
    assert isinstance(warm.text_runtime, OpenVinoDinoText)  # not the torch fallback: nothing failed
    assert warm.text_runtime.conversion.converted is False and warm.text_runtime.conversion.path == path
    assert path.stat().st_mtime_ns == written
    features = warm.image_features(images["landscape"])
    caption = Caption.build(SHORT, warm.tokenizer)
    _assert_same_predictions(warm.raw_predictions(features, caption), first_load.raw_predictions(features, caption),
                             atol=0)


def test_corrupt_cache_file_is_converted_again(first_load, config, images, tmp_path, caplog):
    cached = first_load.text_runtime.conversion.path
    for path in cached.parent.glob(cached.stem + ".*"):
        shutil.copy(path, tmp_path / path.name)
    xml = tmp_path / cached.name
    xml.write_bytes(b"<net>not an OpenVINO model" + xml.read_bytes()[-200:])
    with caplog.at_level(logging.WARNING):
        detector = detector_for(config.replace(openvino_cache_dir=tmp_path))
    assert isinstance(detector.text_runtime, OpenVinoDinoText) and detector.text_runtime.conversion.converted
    assert any("unusable" in r.getMessage() and str(xml) in r.getMessage() for r in caplog.records)
    assert "<net>not" not in xml.read_text()[:100]  # replaced by the new conversion
    features = detector.image_features(images["square"])
    caption = Caption.build(SHORT, detector.tokenizer)
    _assert_same_predictions(detector.raw_predictions(features, caption), first_load.raw_predictions(features, caption))


class _DataDependentFeatMap(torch.nn.Module):
    """A text projection whose output depends on a branch taken on the data: torch.export cannot capture it."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out if float(out.sum()) > -1e30 else -out


def test_failed_export_falls_back_to_torch_with_one_log_line(config, images, tmp_path, caplog):
    model = prepare(build_grounding_dino(config), CPU)
    model.feat_map = _DataDependentFeatMap(model.feat_map)
    with caplog.at_level(logging.INFO):
        runtime = build_dino_text_runtime(config.replace(openvino_cache_dir=tmp_path), model, CPU, torch.float32)
    assert isinstance(runtime, TorchDinoText)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].name == "backend.dino_runtime"
    message = lines[0].getMessage()
    assert "RUNTIME=openvino" in message and "runs on torch" in message and "did not convert" in message
    assert not list(tmp_path.glob("*.xml"))
    detector = GroundingDinoDetector(model, CPU, torch.float32, config.dino_image_size, config.dino_max_size, runtime)
    raw = detector.raw_predictions(detector.image_features(images["square"]), Caption.build(SHORT, detector.tokenizer))
    assert raw.boxes_cxcywh.shape == (60, 4) and raw.token_probs.shape == (60, 256)


def test_without_a_compiler_the_graph_samples_with_grid_sample(config, torch_detector, images, tmp_path, caplog,
                                                                monkeypatch):
    """No operations library (no working C++ compiler): one log line naming the cause, the grid_sample
    graph on OpenVINO (not torch), cached under its own key, the same predictions."""
    monkeypatch.setenv("CXX", "false")
    with caplog.at_level(logging.INFO):
        detector = detector_for(config.replace(openvino_cache_dir=tmp_path))
    runtime = detector.text_runtime
    assert isinstance(runtime, OpenVinoDinoText) and runtime.core == "grid_sample" and runtime.ops is None
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "GridSample" in lines[0] and "false failed on ops.cpp" in lines[0]
    assert '"form": "grid_sample"' in runtime.conversion.path.with_suffix(".json").read_text()
    assert not list((tmp_path / "ops").glob("*.so"))
    features = features_at(torch_detector, images["square"], 320)
    caption = Caption.build(SHORT, torch_detector.tokenizer)
    _assert_same_predictions(detector.raw_predictions(features, caption),
                             torch_detector.raw_predictions(features, caption))


def test_fewer_image_tokens_than_queries_fails_as_on_torch(first_load, torch_detector):
    """groundingdino's query selection needs num_queries image tokens; OpenVINO's TopK would pad instead
    of failing, so such inputs go to torch and fail the same way."""
    from backend.detector import DinoImageFeatures

    sizes = [(4, 3), (2, 2), (1, 1), (1, 1)]  # 18 tokens < 60 queries
    features = DinoImageFeatures(srcs=[torch.randn(1, 256, h, w) for h, w in sizes],
                                 masks=[torch.zeros(1, h, w, dtype=torch.bool) for h, w in sizes],
                                 poss=[torch.randn(1, 256, h, w) for h, w in sizes], image_size=(30, 20))
    caption = Caption.build(SHORT, torch_detector.tokenizer)
    with pytest.raises(RuntimeError) as theirs:
        torch_detector.raw_predictions(features, caption)
    with pytest.raises(RuntimeError) as ours:
        first_load.raw_predictions(features, caption)
    assert str(ours.value) == str(theirs.value)


def test_bf16_graph_is_close_to_fp32_torch(config, first_load, torch_detector, images):
    detector = detector_for(config, dtype=torch.bfloat16)
    runtime = detector.text_runtime
    assert isinstance(runtime, OpenVinoDinoText) and runtime.precision == "bf16"
    assert "-text-bf16-" in runtime.conversion.path.name
    # Stored with f16 weights: about half the f32 file.
    assert runtime.conversion.size_bytes < 0.6 * first_load.text_runtime.conversion.size_bytes
    features = torch_detector.image_features(images["landscape"])
    caption = Caption.build(SHORT, torch_detector.tokenizer)
    ours, theirs = detector.raw_predictions(features, caption), torch_detector.raw_predictions(features, caption)
    assert torch.isfinite(ours.token_probs).all() and 0 <= float(ours.token_probs.min()) <= 1
    # bf16 reorders near-tied queries of the random tiny weights (tests/test_precision.py), so the boxes
    # are compared as sets: nearly every fp32 box has a bf16 box on top of it (bench/ reports real-size IoU).
    iou = box_iou(box_convert(theirs.boxes_cxcywh, "cxcywh", "xyxy"), box_convert(ours.boxes_cxcywh, "cxcywh", "xyxy"))
    assert float((iou.max(dim=1).values > 0.9).float().mean()) >= 0.9


def test_bf16_graph_reads_the_deformable_nodes_inputs_in_bf16_and_predicts_the_same(config, torch_detector, images):
    """At bf16 the runtime compiles its graph with the deformable nodes' inputs and output in bf16
    (``OpsLibrary.narrow_io``): the plugin computes them in bf16 anyway, so the predictions
    are those of the graph compiled without it, to the bit."""
    import openvino as ov

    from backend.dino_runtime import _numpy, bucket_sizes
    from backend.openvino_cache import compile_for_cpu

    detector = detector_for(config, dtype=torch.bfloat16)
    runtime = detector.text_runtime
    assert isinstance(runtime, OpenVinoDinoText) and runtime.ops is not None
    compiled = runtime._request.get_compiled_model()
    nodes = [op for op in compiled.get_runtime_model().get_ordered_ops()
             if op.get_rt_info()["layerType"].astype(str) == "Reference"]
    assert nodes and all(op.get_rt_info()["runtimePrecision"].astype(str) == "bf16" for op in nodes)
    core = runtime.ops.add_to(ov.Core())
    plain = compile_for_cpu(core, core.read_model(runtime.conversion.path), "bf16").create_infer_request()
    features = torch_detector.image_features(images["landscape"])
    inputs = detector.text_inputs(features, Caption.build(LONG, torch_detector.tokenizer))
    logits, boxes = runtime.run(inputs)
    plain.infer([_numpy(t) for t in inputs.padded(bucket_sizes(inputs.sizes)).flat()])
    assert torch.equal(logits, torch.from_numpy(np.array(plain.get_output_tensor(0).data)))
    assert torch.equal(boxes, torch.from_numpy(np.array(plain.get_output_tensor(1).data)))


def test_fusion_softmax_node_only_where_the_kernels_are_vectorised(first_load, monkeypatch):
    """The fusion layers' softmaxes are the library's node where its AVX-512 paths run (this suite's
    machines); elsewhere OpenVINO's own nodes, in a graph cached under another form."""
    from backend import models
    from backend.dino_runtime import text_key
    from backend.openvino_ops import vector_kernels

    runtime = first_load.text_runtime
    assert isinstance(runtime, OpenVinoDinoText)
    compiled = runtime._request.get_compiled_model().get_runtime_model()
    names = [op.get_friendly_name() for op in compiled.get_ordered_ops()]
    assert vector_kernels(models.cpu_flags()) and runtime.fused_softmax
    assert sum(name.startswith("FusionSoftmax") for name in names) == len(first_load.model.transformer.encoder.layers)
    monkeypatch.setattr(models, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not runtime.fused_softmax
    assert not vector_kernels({"avx512f"}) and vector_kernels({"avx512f", "avx512bw", "avx2"})
    assert text_key({}, "f32", "fused", True).form != text_key({}, "f32", "fused", False).form


def test_auto_is_openvino_on_cpu_and_torch_when_asked(config, first_load):
    model = first_load.model
    auto = build_dino_text_runtime(config.replace(runtime="auto"), model, CPU, torch.float32)
    forced = build_dino_text_runtime(config.replace(runtime="torch"), model, CPU, torch.float32)
    assert auto.name == "openvino" and forced.name == "torch"


def test_engine_detections_equal_between_runtimes(config, first_load, images):
    torch_engine = Engine(config.replace(runtime="torch"))
    ov_engine = Engine(config, segmenter=torch_engine.segmenter)
    assert ov_engine.describe()["dino_text_runtime"] == "openvino"
    assert torch_engine.describe()["dino_text_runtime"] == "torch"
    found = 0
    for image in images.values():
        ours = ov_engine.detect(image, "cat . dog . astronaut", box_threshold=0.2, text_threshold=0.2)
        theirs = torch_engine.detect(image, "cat . dog . astronaut", box_threshold=0.2, text_threshold=0.2)
        assert [d.label for d in ours] == [d.label for d in theirs]
        for a, b in zip(ours, theirs, strict=True):
            assert a.box == pytest.approx(b.box, abs=1e-3) and a.score == pytest.approx(b.score, abs=1e-5)
        found += len(ours)
    assert found > 0


def test_feature_level_past_the_export_bound_is_served_as_on_torch(first_load, torch_detector):
    """A level wider than the export's bound (an image past ~8000 px with GROUNDING_DINO_MAX_SIZE raised)
    still gets torch's predictions: such inputs go to torch instead of a graph that never saw them."""
    from backend.detector import DinoImageFeatures
    from backend.dino_runtime import MAX_LEVEL_SIDE

    widths = [MAX_LEVEL_SIDE + 1, MAX_LEVEL_SIDE // 2 + 1, MAX_LEVEL_SIDE // 4 + 1, MAX_LEVEL_SIDE // 8 + 1]
    generator = torch.Generator().manual_seed(1)
    features = DinoImageFeatures(srcs=[torch.randn(1, 256, 1, w, generator=generator) for w in widths],
                                 masks=[torch.zeros(1, 1, w, dtype=torch.bool) for w in widths],
                                 poss=[torch.randn(1, 256, 1, w, generator=generator) for w in widths],
                                 image_size=(8, 8 * widths[0]))
    caption = Caption.build(SHORT, torch_detector.tokenizer)
    _assert_same_predictions(first_load.raw_predictions(features, caption),
                             torch_detector.raw_predictions(features, caption))


def _level_sizes(side_h: int, side_w: int) -> tuple[tuple[int, int], ...]:
    """The four levels' sizes of an image (SwinT-OGC: strides 8, 16, 32, then a stride-2 conv), each
    the previous one halved and rounded up."""
    sizes = [(-(-side_h // 8), -(-side_w // 8))]
    for _ in range(3):
        sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
    return tuple(sizes)


def test_size_buckets_cover_each_image_and_are_few():
    from backend.dino_runtime import bucket_sizes

    buckets = set()
    for long_side in range(800, 1334):  # groundingdino's resize: short side 800, long side at most 1333
        sizes = _level_sizes(800, long_side)
        bucket = bucket_sizes(sizes)
        assert all(bh >= h and bw >= w for (h, w), (bh, bw) in zip(sizes, bucket, strict=True))
        assert bucket_sizes(bucket) == bucket and bucket[0][0] == sizes[0][0]  # 800 px: 100 rows, no padding
        # The image padded to a multiple of 32 px: every level at most one stride-32 step larger.
        assert bucket == _level_sizes(800, -(-long_side // 32) * 32)
        buckets.add(bucket)
    assert len(buckets) == 18


@pytest.mark.parametrize("extra", [None, (3, 5)])
def test_padded_features_predict_as_the_image(torch_detector, images, extra):
    """Padding the features (the size buckets, or more) with masked tokens keeps torch's predictions:
    what lets OpenVINO run every image of a bucket at one set of sizes."""
    from backend.dino_runtime import bucket_sizes

    features = features_at(torch_detector, images["landscape"], 800)
    inputs = torch_detector.text_inputs(features, Caption.build(LONG, torch_detector.tokenizer))
    if extra is None:
        sizes = bucket_sizes(inputs.sizes)
    else:
        sizes = tuple((h + extra[0], w + extra[1]) for h, w in inputs.sizes)
    assert sizes != inputs.sizes
    padded = inputs.padded(sizes)
    assert padded.sizes == sizes
    for (h, w), mask, original in zip(inputs.sizes, padded.masks, inputs.masks, strict=True):
        assert torch.equal(mask[:, :h, :w], original) and bool(mask[:, h:].all()) and bool(mask[:, :, w:].all())
    runtime = torch_detector.text_runtime
    (logits, boxes), (theirs_logits, theirs_boxes) = runtime.run(padded), runtime.run(inputs)
    torch.testing.assert_close(logits.sigmoid(), theirs_logits.sigmoid(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(boxes, theirs_boxes, atol=1e-5, rtol=1e-4)


def test_openvino_runs_an_image_at_its_size_bucket(first_load, torch_detector, images):
    from backend.dino_runtime import bucket_sizes

    features = features_at(torch_detector, images["landscape"], 800)
    caption = Caption.build(SHORT, torch_detector.tokenizer)
    sizes = tuple(tuple(src.shape[2:]) for src in features.srcs)
    assert bucket_sizes(sizes) != sizes  # this image is padded
    ours = first_load.raw_predictions(features, caption)
    request = first_load.text_runtime._request
    assert tuple(tuple(request.get_input_tensor(level).shape[2:]) for level in range(4)) == bucket_sizes(sizes)
    _assert_same_predictions(ours, torch_detector.raw_predictions(features, caption))
