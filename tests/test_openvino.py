"""RUNTIME=openvino: SAM's image encoder converted with torch.export, cached on disk, and run by OpenVINO
with the explanation's attention reductions as graph outputs; checked against the torch path on the
tiny random-weight models (real architectures)."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from backend.config import EngineConfig
from backend.encoder_runtime import TorchImageEncoder, build_encoder_runtime
from backend.engine import Engine
from backend.models import build_sam
from backend.openvino_encoder import CacheKey, OpenVinoImageEncoder
from backend.sam_attention import use_fast_attention
from backend.segmenter import SamSegmenter
from backend.weights import file_sha256
from tests.sam_encodes import DataDependentNeck, forbid_conversion

CPU = torch.device("cpu")
PROMPT = "cat . dog"


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino_cache")


@pytest.fixture(scope="module")
def config(tiny_cache, ov_cache) -> EngineConfig:
    return EngineConfig.from_file(tiny_cache / "engine.json", runtime="openvino", openvino_cache_dir=ov_cache)


def encoder_runtime(config: EngineConfig, capture: bool = True, dtype: torch.dtype = torch.float32):
    """A fresh SAM from the checkpoint and the runtime the config asks for (as Engine builds them)."""
    sam = build_sam(config)
    return sam, build_encoder_runtime(config.replace(explanations=capture), sam.image_encoder, CPU, dtype)


@pytest.fixture(scope="module")
def first_load(config):
    """The first load of the capture graph: converts into the empty cache folder."""
    return encoder_runtime(config)[1]


@pytest.fixture(scope="module")
def pixels(config, chelsea):
    """chelsea (300 x 451, so part of SAM's square input is padding) as the encoder's input."""
    sam = build_sam(config)
    return SamSegmenter(sam, CPU).preprocess(chelsea)


@pytest.fixture(scope="module")
def torch_encoded(config, pixels):
    """The torch runtime's features and capture of the same image: the reference."""
    sam = build_sam(config)
    x, input_size = pixels
    reference = TorchImageEncoder(sam.image_encoder)
    return reference.encode(x, input_size, capture=True), reference.encode(x, input_size, capture=False)


def test_first_load_converts_and_caches_by_checkpoint(first_load, config, ov_cache):
    assert isinstance(first_load, OpenVinoImageEncoder)
    conversion = first_load.conversions[True]
    assert conversion.converted and conversion.path is not None and conversion.path.parent == ov_cache
    assert conversion.path.is_file() and conversion.path.with_suffix(".bin").is_file()
    assert conversion.size_bytes == conversion.path.stat().st_size + conversion.path.with_suffix(".bin").stat().st_size
    assert "1024px-f32-capture" in conversion.path.name
    key = first_load.conversions[True].path.with_suffix(".json").read_text()
    assert file_sha256(config.sam_checkpoint_path) in key
    # Only the graph the engine asked for exists: no plain graph was converted.
    assert list(first_load.conversions) == [True]


def test_warm_start_reads_the_cache_and_never_converts(first_load, config, pixels, monkeypatch):
    forbid_conversion(monkeypatch, "a warm start must not export or convert")
    path = first_load.conversions[True].path
    written = path.stat().st_mtime_ns
    _, warm = encoder_runtime(config)
    assert isinstance(warm, OpenVinoImageEncoder)  # not the torch fallback: nothing failed
    assert warm.conversions[True].converted is False and warm.conversions[True].path == path
    assert path.stat().st_mtime_ns == written
    x, input_size = pixels
    a, b = first_load.encode(x, input_size, True), warm.encode(x, input_size, True)
    np.testing.assert_array_equal(a.features.numpy(), b.features.numpy())


def test_cache_key_separates_what_changes_the_graph():
    base = CacheKey({"sam_variant": "vit_b", "checkpoint_sha256": "a" * 64}, 1024, "f32", True)
    arch = {"sam_variant": "vit_b", "checkpoint_sha256": "a" * 64, "sam_arch": {"x": 1}}
    others = [CacheKey({"sam_variant": "vit_b", "checkpoint_sha256": "b" * 64}, 1024, "f32", True),
              CacheKey(arch, 1024, "f32", True),
              CacheKey(base.identity, 512, "f32", True), CacheKey(base.identity, 1024, "bf16", True),
              CacheKey(base.identity, 1024, "f32", False), CacheKey(base.identity, 1024, "f32", True, openvino="0.0")]
    assert len({base.stem, *(k.stem for k in others)}) == 1 + len(others)
    assert CacheKey(dict(base.identity), 1024, "f32", True).stem == base.stem


def test_capture_graph_equals_torch_capture(first_load, pixels, torch_encoded):
    x, input_size = pixels
    ours, (theirs, _) = first_load.encode(x, input_size, capture=True), torch_encoded
    np.testing.assert_allclose(ours.features.numpy(), theirs.features.numpy(), rtol=1e-4, atol=1e-4)
    assert ours.attention is not None and theirs.attention is not None
    assert sorted(ours.attention.received) == sorted(theirs.attention.received) == [1, 3]
    for block, expected in theirs.attention.received.items():
        got = ours.attention.received[block]
        assert got.shape == expected.shape == (64, 64) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-8)
        assert got.sum() == pytest.approx(1.0, abs=1e-4)
    ol, tl = ours.attention.last_block, theirs.attention.last_block
    assert (ol.block_index, ol.num_heads, ol.grid) == (tl.block_index, tl.num_heads, tl.grid)
    assert ol.matrix.dtype == np.float16 and ol.matrix.shape == tl.matrix.shape == (1, 4096, 4096)
    np.testing.assert_allclose(ol.matrix.astype(np.float32), tl.matrix.astype(np.float32), rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(ol.received, tl.received, rtol=1e-4, atol=1e-9)


def test_plain_graph_equals_torch_and_is_made_on_first_use(config, pixels, torch_encoded, tmp_path):
    sam = build_sam(config)
    use_fast_attention(sam.image_encoder)
    runtime = OpenVinoImageEncoder(sam.image_encoder, torch.float32, CPU, capture=True, cache_dir=tmp_path,
                                   identity={"sam_variant": "tiny"})  # keeps its torch weights
    x, input_size = pixels
    ours = runtime.encode(x, input_size, capture=False)
    assert ours.attention is None and runtime.conversions[False].converted
    np.testing.assert_allclose(ours.features.numpy(), torch_encoded[1].features.numpy(), rtol=1e-4, atol=1e-4)


def _stored_bytes(module: torch.nn.Module) -> int:
    return sum(t.untyped_storage().nbytes() for t in (*module.parameters(), *module.buffers()))


def test_engine_runtime_frees_the_torch_encoder_weights(config, pixels, torch_encoded, tmp_path):
    """Once OpenVINO serves, the torch encoder's weights go (the compiled graph has its own copy); the
    graph kind the engine asked for still encodes, and the other is made from the checkpoint loaded
    again, leaving the engine's module freed."""
    sam, runtime = encoder_runtime(config.replace(openvino_cache_dir=tmp_path))
    assert isinstance(runtime, OpenVinoImageEncoder) and runtime.torch_released
    loaded = build_sam(config)
    assert _stored_bytes(sam.image_encoder) < 0.01 * _stored_bytes(loaded.image_encoder)
    assert _stored_bytes(sam.mask_decoder) == _stored_bytes(loaded.mask_decoder)  # only the encoder's go
    sam.eval()  # the module still works as a module (shapes kept), as SamSegmenter's .to().eval() needs
    x, input_size = pixels
    ours, (theirs, plain) = runtime.encode(x, input_size, capture=True), torch_encoded
    np.testing.assert_allclose(ours.features.numpy(), theirs.features.numpy(), rtol=1e-4, atol=1e-4)
    for block, expected in theirs.attention.received.items():
        np.testing.assert_allclose(ours.attention.received[block], expected, rtol=1e-4, atol=1e-8)
    ours = runtime.encode(x, input_size, capture=False)
    assert ours.attention is None and runtime.conversions[False].converted
    np.testing.assert_allclose(ours.features.numpy(), plain.features.numpy(), rtol=1e-4, atol=1e-4)
    assert _stored_bytes(sam.image_encoder) < 0.01 * _stored_bytes(loaded.image_encoder)


def test_bf16_capture_is_close_to_fp32_torch(config, first_load, pixels, torch_encoded):
    _, runtime = encoder_runtime(config, dtype=torch.bfloat16)
    assert isinstance(runtime, OpenVinoImageEncoder) and runtime.precision == "bf16"
    assert "-bf16-capture" in runtime.conversions[True].path.name
    # Stored with f16 weights: about half the f32 file.
    assert runtime.conversions[True].size_bytes < 0.6 * first_load.conversions[True].size_bytes
    x, input_size = pixels
    ours, theirs = runtime.encode(x, input_size, True), torch_encoded[0]
    a, b = ours.features.numpy().ravel(), theirs.features.numpy().ravel()
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999
    for block, expected in theirs.attention.received.items():
        np.testing.assert_allclose(ours.attention.received[block], expected, rtol=0.05, atol=2e-5)


def test_corrupt_cache_file_is_converted_again(first_load, config, pixels, tmp_path, caplog):
    for path in first_load.conversions[True].path.parent.glob(first_load.conversions[True].path.stem + ".*"):
        shutil.copy(path, tmp_path / path.name)
    xml = tmp_path / first_load.conversions[True].path.name
    xml.write_bytes(b"<net>not an OpenVINO model" + xml.read_bytes()[-200:])
    with caplog.at_level(logging.WARNING):
        _, runtime = encoder_runtime(config.replace(openvino_cache_dir=tmp_path))
    assert isinstance(runtime, OpenVinoImageEncoder) and runtime.conversions[True].converted
    assert any("unusable" in r.getMessage() and str(xml) in r.getMessage() for r in caplog.records)
    x, input_size = pixels
    np.testing.assert_allclose(runtime.encode(x, input_size, True).features.numpy(),
                               first_load.encode(x, input_size, True).features.numpy(), rtol=1e-5, atol=1e-5)
    assert "<net>not" not in xml.read_text()[:100]  # replaced by the new conversion


@pytest.mark.parametrize("capture", [True, False])
def test_failed_conversion_falls_back_to_torch_with_one_log_line(config, pixels, tmp_path, caplog, capture):
    sam = build_sam(config)
    sam.image_encoder.neck = DataDependentNeck(sam.image_encoder.neck)
    with caplog.at_level(logging.INFO):
        runtime = build_encoder_runtime(config.replace(openvino_cache_dir=tmp_path, explanations=capture),
                                        sam.image_encoder, CPU, torch.float32)
    assert isinstance(runtime, TorchImageEncoder)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].name == "backend.encoder_runtime"
    message = lines[0].getMessage()
    assert "RUNTIME=openvino" in message and "runs on torch" in message and "did not convert" in message
    assert not list(tmp_path.glob("*.xml"))
    x, input_size = pixels
    assert runtime.encode(x, input_size, capture).features.shape == (1, 256, 64, 64)


def test_mobile_sam_converts_and_matches_torch(tiny_cache, ov_cache, chelsea):
    config = EngineConfig.from_file(tiny_cache / "engine-mobilesam.json", runtime="openvino",
                                    openvino_cache_dir=ov_cache)
    _, runtime = encoder_runtime(config)  # frees that SAM's torch encoder weights: the reference loads its own
    sam = build_sam(config)
    assert isinstance(runtime, OpenVinoImageEncoder) and runtime.global_blocks == ()
    # TinyViT has no global attention: only the plain graph exists, capture requests get features only.
    assert list(runtime.conversions) == [False]
    x, input_size = SamSegmenter(build_sam(config), CPU).preprocess(chelsea)
    ours = runtime.encode(x, input_size, capture=True)
    theirs = TorchImageEncoder(sam.image_encoder).encode(x, input_size, capture=True)
    assert ours.attention is None and theirs.attention is None
    np.testing.assert_allclose(ours.features.numpy(), theirs.features.numpy(), rtol=1e-4, atol=1e-4)


def test_auto_is_openvino_on_cpu_and_torch_when_asked(config):
    sam = build_sam(config)
    auto = build_encoder_runtime(config.replace(runtime="auto"), sam.image_encoder, CPU, torch.float32)
    forced = build_encoder_runtime(config.replace(runtime="torch"), sam.image_encoder, CPU, torch.float32)
    assert auto.name == "openvino" and forced.name == "torch"


@pytest.fixture(scope="module")
def engines(config):
    ov_engine = Engine(config)
    torch_engine = Engine(config.replace(runtime="torch"), detector=ov_engine.detector)
    return ov_engine, torch_engine


def test_engine_masks_and_explanations_equal_torch(engines, chelsea):
    ov_engine, torch_engine = engines
    assert ov_engine.describe()["sam_encoder_runtime"] == "openvino"
    assert torch_engine.describe()["sam_encoder_runtime"] == "torch"
    ours = ov_engine.explain(chelsea, PROMPT, box_threshold=0.3, text_threshold=0.25)
    theirs = torch_engine.explain(chelsea, PROMPT, box_threshold=0.3, text_threshold=0.25)
    assert ours.segments and len(ours.segments) == len(theirs.segments)
    for a, b in zip(ours.segments, theirs.segments, strict=True):
        assert a.label == b.label and a.box == pytest.approx(b.box)
        union = np.logical_or(a.mask, b.mask).sum()
        assert union == 0 or np.logical_and(a.mask, b.mask).sum() / union >= 0.999
        assert a.predicted_iou == pytest.approx(b.predicted_iou, abs=1e-4)
    assert sorted(ours.encoder_received) == sorted(theirs.encoder_received)
    for block, expected in theirs.encoder_received.items():
        np.testing.assert_allclose(ours.encoder_received[block], expected, rtol=1e-4, atol=1e-8)
    for a, b in zip(ours.masks, theirs.masks, strict=True):
        np.testing.assert_allclose(a.decoder_map, b.decoder_map, rtol=1e-3, atol=1e-6)
        assert sorted(a.token_look) == sorted(b.token_look)
        for block, expected in b.token_look.items():
            np.testing.assert_allclose(a.token_look[block], expected, rtol=2e-3, atol=1e-7)


def test_planted_attention_lands_on_the_right_token(config, tmp_path):
    """The geometry check of tests/test_sam_attention.py through the OpenVINO capture graph: an encoder
    made so every query of global block 1 attends to one token finds that token, padding excluded."""
    from tests.test_sam_attention import _planted_encoder

    r, c = 10, 42  # 500 x 333 photo -> 1024 x 682 input: column 42 is the last, partial token column
    sam = build_sam(config)
    encoder, image = _planted_encoder(sam, r, c)
    runtime = build_encoder_runtime(config.replace(openvino_cache_dir=tmp_path), encoder, CPU, torch.float32)
    assert isinstance(runtime, OpenVinoImageEncoder)
    encoded = runtime.encode(image, (1024, 682), capture=True)
    received = encoded.attention.received[1]
    assert np.unravel_index(received.argmax(), received.shape) == (r, c)
    assert received[r, c] > 0.99


def test_cache_folder_is_beside_the_weights_unless_set(tmp_path):
    from backend.openvino_cache import cache_folder

    assert cache_folder(EngineConfig(cache_dir=tmp_path)) == tmp_path / "openvino"
    assert cache_folder(EngineConfig(cache_dir=tmp_path, sam_checkpoint=str(tmp_path / "w" / "sam.pth"))) == (
        tmp_path / "w" / "openvino")
    chosen = EngineConfig.from_env({"OPENVINO_CACHE_DIR": str(tmp_path / "ov"), "MODEL_CACHE_DIR": str(tmp_path)})
    assert cache_folder(chosen) == tmp_path / "ov"


def test_capture_graph_sums_heads_without_a_matrix_per_head(config, tmp_path):
    """What made the capture graph cost as much as the plain one (bench/README.md): no global block adds
    each head's N x N softmax into a running sum, and in bf16 every softmax runs in bf16 (a head sum
    read as an output kept the last block's softmax in f32, with conversions both ways)."""
    import openvino as ov

    from backend.encoder_graph import CapturingEncoder
    from backend.models import NATIVE_BF16_FLAGS, cpu_flags
    from backend.openvino_cache import convert

    sam = build_sam(config)
    use_fast_attention(sam.image_encoder)
    n = 64 * 64
    model = convert(CapturingEncoder(sam.image_encoder), (torch.zeros(1, 3, 1024, 1024), torch.full((1, n), 1.0 / n)))
    square_adds = [op for op in model.get_ordered_ops() if op.get_type_name() == "Add"
                   and op.get_output_partial_shape(0).is_static and list(op.get_output_shape(0))[-2:] == [n, n]]
    assert square_adds == []
    if not set(NATIVE_BF16_FLAGS) & cpu_flags():
        pytest.skip("no native bf16 on this CPU: OpenVINO runs f32 whatever the hint")
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    softmax = [op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ops()
               if op.get_rt_info()["layerType"].astype(str) == "Softmax"]
    assert softmax and {p.lower() for p in softmax} == {"bf16"}, softmax
