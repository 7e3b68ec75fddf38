"""RUNTIME=openvino for Grounding DINO's image half (Swin backbone, input projections, positions): one
torch.export graph with a dynamic image height and width, converted once, cached on disk, and checked
against groundingdino's own torch forward at several sizes and aspect ratios (tiny random-weight models,
real architectures; the Swin here has two blocks a stage, so shifted windows are covered)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from backend.config import EngineConfig
from backend.detector import DinoImageFeatures, GroundingDinoDetector, prepare
from backend.dino_image_graph import DinoImageGraph
from backend.dino_image_runtime import MAX_SIDE, MIN_SIDE, OpenVinoDinoImage, TorchDinoImage, build_dino_image_runtime
from backend.engine import Engine
from backend.models import build_grounding_dino, build_grounding_dino_architecture, build_sam
from backend.segmenter import SamSegmenter
from backend.weights import file_sha256
from tests.sam_encodes import DataDependentNeck, forbid_conversion

CPU = torch.device("cpu")
PROMPT = "cat . dog . astronaut"
# (short side, long-side cap) of the resize: the tiny config's 320/533 and the production 800/1333.
SIZES = [(320, 533), (800, 1333)]


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino_cache")


@pytest.fixture(scope="module")
def config(tiny_cache, ov_cache, tmp_path_factory) -> EngineConfig:
    """The tiny Grounding DINO with two Swin blocks a stage (the second shifts its windows, as in
    Swin-T), saved as a checkpoint and loaded through the production code."""
    base = EngineConfig.from_file(tiny_cache / "engine.json", runtime="openvino", openvino_cache_dir=ov_cache,
                                  precision="fp32")
    arch = dict(base.dino_arch or {})
    arch["swin"] = {**arch["swin"], "depths": [2, 2, 2, 2]}
    shifted = base.replace(dino_arch=arch)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dino") / "tiny_groundingdino_shifted.pth"
    torch.save({"model": build_grounding_dino_architecture(shifted).state_dict()}, path)
    return shifted.replace(dino_checkpoint=str(path))


def detector_for(config: EngineConfig, dtype: torch.dtype = torch.float32, side: int = 0,
                 max_size: int = 0) -> GroundingDinoDetector:
    """A fresh Grounding DINO from the checkpoint with the image runtime the config asks for (as Engine
    builds it), the text half on torch."""
    model = prepare(build_grounding_dino(config), CPU)
    return GroundingDinoDetector(model, CPU, dtype, side or config.dino_image_size, max_size or config.dino_max_size,
                                 image_runtime=build_dino_image_runtime(config, model, CPU, dtype))


def resized(detector: GroundingDinoDetector, side: int, max_size: int) -> GroundingDinoDetector:
    """``detector``'s model and runtimes with another resize."""
    return GroundingDinoDetector(detector.model, CPU, detector.dtype, side, max_size, detector.text_runtime,
                                 detector.image_runtime)


@pytest.fixture(scope="module")
def first_load(config) -> GroundingDinoDetector:
    """The first load: converts into the empty cache folder."""
    return detector_for(config)


@pytest.fixture(scope="module")
def torch_detector(first_load) -> GroundingDinoDetector:
    """The same model on groundingdino's own forward."""
    return GroundingDinoDetector(first_load.model, CPU, torch.float32, first_load.image_size, first_load.max_size,
                                 image_runtime=TorchDinoImage(first_load.model))


@pytest.fixture(scope="module")
def images(chelsea, astronaut) -> dict[str, np.ndarray]:
    """Landscape, square, portrait and a wide strip: four aspect ratios."""
    return {"landscape": chelsea, "square": astronaut, "portrait": np.ascontiguousarray(chelsea.transpose(1, 0, 2)),
            "strip": np.ascontiguousarray(astronaut[200:280])}


def assert_same_features(ours: DinoImageFeatures, theirs: DinoImageFeatures, atol: float = 1e-4) -> None:
    assert len(ours.srcs) == len(theirs.srcs) == 4 and ours.image_size == theirs.image_size
    for a, b in zip([*ours.srcs, *ours.poss], [*theirs.srcs, *theirs.poss], strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)
    for a, b in zip(ours.masks, theirs.masks, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("height, width", [(320, 427), (533, 300), (224, 224), (301, 533), (MIN_SIDE, 533)])
def test_graph_computes_groundingdinos_forward(torch_detector, height, width):
    """The export-friendly rewrite is groundingdino's arithmetic: equal on torch (to float rounding: the
    windows' attention is one SDPA, its terms summed in another order) at sides that are and are not
    multiples of the patch, the window (7) and 32, so every padding path is taken."""
    image = torch.randn(3, height, width, generator=torch.Generator().manual_seed(height * width))
    theirs = torch_detector.image_runtime.run(image)
    with torch.inference_mode():
        ours = DinoImageGraph(torch_detector.model).eval()(image[None])
    for a, b in zip(ours, [*theirs.srcs, *theirs.poss], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_equals_groundingdinos_module(torch_detector, shifted):
    """``_window_attention`` (three qkv linears, one permute each way, one SDPA) against the stock
    WindowAttention on the same windows, with the shifted windows' mask or without; 3 x 4 windows."""
    from backend.dino_image_graph import _shift_mask, _window_attention

    block = torch_detector.model.backbone[0].layers[0].blocks[int(shifted)]
    size, channels = int(block.window_size), block.attn.qkv.in_features
    assert int(block.shift_size) == (size // 2 if shifted else 0)
    x = torch.randn(1, 3 * size, 4 * size, channels, generator=torch.Generator().manual_seed(7))
    mask = _shift_mask(3, 4, size, int(block.shift_size), x.device) if shifted else None
    windows = x.view(1, 3, size, 4, size, channels).permute(0, 1, 3, 2, 4, 5).reshape(-1, size * size, channels)
    with torch.inference_mode():
        # The stock module ends with its projection; _window_attention leaves it to the block.
        expected = block.attn(windows, mask=mask).view(1, 3, 4, size, size, channels).permute(0, 1, 3, 2, 4, 5)
        got = block.attn.proj(_window_attention(block.attn, x, size, mask))
    torch.testing.assert_close(got, expected.reshape(1, 3 * size, 4 * size, channels), atol=1e-5, rtol=1e-5)


def test_first_load_converts_and_caches_by_checkpoint(first_load, config, ov_cache):
    runtime = first_load.image_runtime
    assert isinstance(runtime, OpenVinoDinoImage) and runtime.precision == "f32"
    conversion = runtime.conversion
    assert conversion.converted and conversion.path is not None and conversion.path.parent == ov_cache
    assert conversion.path.name.startswith("dino-swint_ogc-image-f32-")
    assert file_sha256(config.dino_checkpoint_path) in conversion.path.with_suffix(".json").read_text()


def test_one_conversion_serves_every_size_and_aspect_ratio(first_load, torch_detector, images, ov_cache,
                                                           monkeypatch):
    forbid_conversion(monkeypatch, "a new image size must not export or convert again")
    inputs = set()
    # Every aspect ratio at the tiny config's size; two at the production size (800 x 1203, 208 x 1333).
    for (side, max_size), names in zip(SIZES, [list(images), ["landscape", "strip"]], strict=True):
        ours, theirs = resized(first_load, side, max_size), resized(torch_detector, side, max_size)
        for name in names:
            inputs.add(tuple(ours.preprocess(images[name]).shape[1:]))
            assert_same_features(ours.image_features(images[name]), theirs.image_features(images[name]))
    # Non-square, and sides that are not multiples of 32.
    assert len(inputs) == len(images) + 2 and any(h % 32 and w % 32 for h, w in inputs)
    assert len(list(ov_cache.glob("dino-*-image-*.xml"))) == 1


def test_warm_start_reads_the_cache_and_never_converts(first_load, config, images, monkeypatch):
    forbid_conversion(monkeypatch, "a warm start must not export or convert")
    path = first_load.image_runtime.conversion.path
    written = path.stat().st_mtime_ns
    warm = detector_for(config)
    assert isinstance(warm.image_runtime, OpenVinoDinoImage)  # not the torch fallback: nothing failed
    assert warm.image_runtime.conversion.converted is False and warm.image_runtime.conversion.path == path
    assert path.stat().st_mtime_ns == written
    assert_same_features(warm.image_features(images["landscape"]), first_load.image_features(images["landscape"]),
                         atol=0)


def test_engine_detections_equal_between_runtimes(config, first_load, torch_detector, images):
    segmenter = SamSegmenter(build_sam(config), CPU)
    ours = Engine(config, detector=first_load, segmenter=segmenter)
    theirs = Engine(config, detector=torch_detector, segmenter=segmenter)
    assert ours.describe()["dino_image_runtime"] == "openvino" and theirs.describe()["dino_image_runtime"] == "torch"
    found = 0
    for image in images.values():
        a_list = ours.detect(image, PROMPT, box_threshold=0.2, text_threshold=0.2)
        b_list = theirs.detect(image, PROMPT, box_threshold=0.2, text_threshold=0.2)
        assert [d.label for d in a_list] == [d.label for d in b_list]
        for a, b in zip(a_list, b_list, strict=True):
            assert a.box == pytest.approx(b.box, abs=1e-2) and a.score == pytest.approx(b.score, abs=1e-4)
        found += len(a_list)
    assert found > 0
    # Which runtime made the boxes is part of the version; the torch one is the version it always was.
    assert ours.model_version == theirs.model_version + "-sam-torch-dino-image-openvino-text-torch"


@pytest.mark.parametrize("height, width", [(MIN_SIDE - 1, 600), (40, 533), (MIN_SIDE, MAX_SIDE + 1)])
def test_image_outside_the_graphs_bounds_runs_on_torch(first_load, torch_detector, height, width, caplog):
    """Slivers (a side under MIN_SIDE, where a level would be one token across) and sides past the
    export's bound get torch's features, with one log line saying why."""
    image = torch.randn(3, height, width, generator=torch.Generator().manual_seed(width))
    runtime = first_load.image_runtime
    assert isinstance(runtime, OpenVinoDinoImage) and not runtime.fits(image)
    with caplog.at_level(logging.INFO, logger="backend.dino_image_runtime"):
        ours = runtime.run(image)
    theirs = torch_detector.image_runtime.run(image)
    for a, b in zip([*ours.srcs, *ours.poss], [*theirs.srcs, *theirs.poss], strict=True):
        assert torch.equal(a, b)
    lines = [r.getMessage() for r in caplog.records if r.name == "backend.dino_image_runtime"]
    assert len(lines) == 1 and f"{height} x {width}" in lines[0] and "runs on torch" in lines[0]


def test_failed_export_falls_back_to_torch_with_one_log_line(config, images, tmp_path, caplog):
    model = prepare(build_grounding_dino(config), CPU)
    model.input_proj[0] = DataDependentNeck(model.input_proj[0])  # a projection export cannot capture
    with caplog.at_level(logging.INFO):
        runtime = build_dino_image_runtime(config.replace(openvino_cache_dir=tmp_path), model, CPU, torch.float32)
    assert isinstance(runtime, TorchDinoImage)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].name == "backend.dino_image_runtime"
    message = lines[0].getMessage()
    assert "RUNTIME=openvino" in message and "image half runs on torch" in message and "did not convert" in message
    assert not list(tmp_path.glob("*.xml"))
    detector = GroundingDinoDetector(model, CPU, torch.float32, config.dino_image_size, config.dino_max_size,
                                     image_runtime=runtime)
    assert detector.detect(detector.image_features(images["square"]), ["cat"], 0.0, 0.0, 0.5, 3)


def test_auto_is_openvino_on_cpu_and_torch_when_asked(config, first_load):
    model = first_load.model
    assert build_dino_image_runtime(config.replace(runtime="auto"), model, CPU, torch.float32).name == "openvino"
    assert build_dino_image_runtime(config.replace(runtime="torch"), model, CPU, torch.float32).name == "torch"


def test_bf16_graph_is_close_to_fp32_torch(config, first_load, torch_detector, images):
    detector = detector_for(config, dtype=torch.bfloat16)
    runtime = detector.image_runtime
    assert isinstance(runtime, OpenVinoDinoImage) and runtime.precision == "bf16"
    assert "-image-bf16-" in runtime.conversion.path.name
    ours, theirs = detector.image_features(images["landscape"]), torch_detector.image_features(images["landscape"])
    for a, b in zip([*ours.srcs, *ours.poss], [*theirs.srcs, *theirs.poss], strict=True):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape  # the dtype torch's autocast gives
        cosine = torch.nn.functional.cosine_similarity(a.float().flatten(), b.flatten(), dim=0)
        assert float(cosine) > 0.99
