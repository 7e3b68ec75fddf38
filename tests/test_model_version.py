"""The model version names the runtime that made a prediction: SAM's encoder on OpenVINO gives slightly
different masks than on torch, so Label Studio (and the jobs' skip rules, which compare versions)
must see them as different models, while torch's versions stay what they were before there was a
choice and every version is the same after a restart with the same settings."""

from __future__ import annotations

import re

import pytest
import torch

from backend.config import EngineConfig
from backend.encoder_runtime import build_encoder_runtime
from backend.engine import Engine, model_version
from backend.engine_holder import EngineHolder
from backend.models import build_sam
from backend.segmenter import SamSegmenter
from tests.sam_encodes import DataDependentNeck

CPU = torch.device("cpu")
TORCH_VERSION = re.compile(r"^grounded-sam-[\w.]+-[\w.]+-[0-9a-f]{10}$")  # no runtime suffix


@pytest.fixture(scope="module")
def config(tiny_cache, tmp_path_factory) -> EngineConfig:
    return EngineConfig.from_file(tiny_cache / "engine.json", runtime="openvino", device="cpu", precision="fp32",
                                  openvino_cache_dir=tmp_path_factory.mktemp("openvino_cache"))


def _loaded(config: EngineConfig) -> EngineHolder:
    holder = EngineHolder(config_loader=lambda: config)
    holder.start()
    holder.get(timeout=300)
    return holder


@pytest.fixture(scope="module")
def served(config) -> dict[str, EngineHolder]:
    """One loaded holder per RUNTIME, as the server loads them (background loader, real models)."""
    return {runtime: _loaded(config.replace(runtime=runtime)) for runtime in ("torch", "openvino")}


def test_openvino_and_torch_engines_have_different_versions(served):
    on_torch, on_openvino = served["torch"].get(), served["openvino"].get()
    assert on_torch.segmenter.encoder.name == "torch" and on_openvino.segmenter.encoder.name == "openvino"
    assert on_torch.model_version != on_openvino.model_version
    # Torch keeps the version it had before the runtime was part of it; OpenVINO adds a suffix only.
    assert TORCH_VERSION.match(on_torch.model_version)
    assert on_openvino.model_version == on_torch.model_version + "-openvino"


def test_version_is_known_before_load_and_unchanged_by_it(config, served):
    for runtime, holder in served.items():
        before_load = EngineHolder(config_loader=lambda r=runtime: config.replace(runtime=r)).model_version
        assert before_load == holder.model_version == holder.get().model_version


def test_same_settings_give_the_same_version_after_a_restart(config, served):
    again = _loaded(config)  # a second process start: reads the converted encoder from the cache
    assert again.get().segmenter.encoder.name == "openvino"
    assert again.model_version == served["openvino"].model_version


def test_precision_still_changes_the_version_on_each_runtime(config):
    for runtime in ("torch", "openvino"):
        assert model_version(config.replace(precision="bf16"), runtime) != model_version(config, runtime)


def test_runtime_that_fell_back_to_torch_gets_torch_version(config, served, tmp_path):
    """RUNTIME=openvino whose encoder does not convert serves on torch: its predictions are torch's, and
    so is the version (the setting string would name OpenVINO)."""
    sam = build_sam(config)
    sam.image_encoder.neck = DataDependentNeck(sam.image_encoder.neck)
    runtime = build_encoder_runtime(config.replace(openvino_cache_dir=tmp_path), sam.image_encoder, CPU,
                                    torch.float32)
    engine = Engine(config, detector=served["torch"].get().detector,
                    segmenter=SamSegmenter(sam, CPU, torch.float32, runtime))
    assert engine.segmenter.encoder.name == "torch"
    assert engine.model_version == served["torch"].model_version
    assert not engine.model_version.endswith("-openvino")


def test_version_names_which_model_runs_where(config, served):
    """SAM's encoder on OpenVINO with Grounding DINO's text half on torch is neither all-torch nor
    all-OpenVINO: its boxes are torch's, its masks OpenVINO's."""
    mixed = Engine(config, detector=served["torch"].get().detector, segmenter=served["openvino"].get().segmenter)
    assert mixed.segmenter.encoder.name == "openvino" and mixed.detector.text_runtime.name == "torch"
    versions = {mixed.model_version, served["torch"].model_version, served["openvino"].model_version}
    assert len(versions) == 3
    assert mixed.model_version.endswith("-sam-openvino-dino-torch")
    assert served["openvino"].get().detector.text_runtime.name == "openvino"


def test_version_names_grounding_dinos_halves_apart_when_they_differ(config, served):
    """Grounding DINO's image half on torch (say its conversion fell back) with its text half and SAM on
    OpenVINO: its features are torch's, so the version is neither the all-OpenVINO one nor torch's."""
    from backend.detector import GroundingDinoDetector
    from backend.dino_image_runtime import TorchDinoImage

    on_openvino = served["openvino"].get()
    assert on_openvino.detector.image_runtime.name == "openvino"
    detector = on_openvino.detector
    halves = GroundingDinoDetector(detector.model, CPU, detector.dtype, detector.image_size, detector.max_size,
                                   detector.text_runtime, TorchDinoImage(detector.torch_model()))
    mixed = Engine(config, detector=halves, segmenter=on_openvino.segmenter)
    assert mixed.model_version.endswith("-sam-openvino-dino-image-torch-text-openvino")
    assert mixed.model_version not in {served["torch"].model_version, served["openvino"].model_version}
