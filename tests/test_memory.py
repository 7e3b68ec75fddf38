"""Memory is bounded in bytes: the one LRU cache (backend/cache.py), size settings with units, masks kept
at SAM's low resolution, /api/explain responses sized for viewing, and capped labeling configs."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from backend.cache import LruCache, nbytes
from backend.config import ConfigError, EngineConfig, parse_size
from backend.ls_model import ModelSettings
from backend.project_state import ProjectMemory

MiB = 1 << 20


# -- the cache ----------------------------------------------------------------------------------------
def test_cache_evicts_least_recently_used_until_the_bytes_fit():
    cache: LruCache[bytes] = LruCache(max_bytes=300, sizeof=len)
    for key in "abc":
        cache.put(key, b"x" * 100)
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", b"x" * 150)
    assert cache.get("b") is None and cache.get("c") is None  # two had to go for 150 bytes
    assert cache.get("a") is not None and cache.get("d") is not None
    assert cache.nbytes == 250 and len(cache) == 2


def test_cache_bounds_entries_and_bytes_together():
    cache: LruCache[np.ndarray] = LruCache(capacity=3, max_bytes=10 * MiB)
    for i in range(5):
        cache.put(i, np.zeros(MiB, dtype=np.uint8))
    assert len(cache) == 3 and cache.nbytes == 3 * MiB
    for i in range(5, 8):
        cache.put(i, np.zeros(4 * MiB, dtype=np.uint8))
    assert len(cache) == 2 and cache.nbytes == 8 * MiB


def test_value_larger_than_the_budget_is_returned_but_not_cached():
    cache: LruCache[np.ndarray] = LruCache(max_bytes=2 * MiB)
    small = np.zeros(MiB, dtype=np.uint8)
    cache.put("small", small)
    big = cache.get_or_compute("big", lambda: np.zeros(3 * MiB, dtype=np.uint8))
    assert big.nbytes == 3 * MiB
    assert cache.get("big") is None and cache.get("small") is small  # nothing was evicted for it
    assert cache.nbytes == MiB


def test_replacing_a_key_counts_its_bytes_once():
    cache: LruCache[bytes] = LruCache(max_bytes=1000, sizeof=len)
    for size in (100, 400, 200):
        cache.put("k", b"x" * size)
    assert cache.nbytes == 200 and len(cache) == 1
    assert cache.pop("k") is not None and cache.nbytes == 0


def test_concurrent_get_or_compute_computes_each_key_once_and_stays_in_budget():
    cache: LruCache[np.ndarray] = LruCache(max_bytes=4 * MiB)
    calls: dict[int, int] = {}
    lock = threading.Lock()
    peak = [0]

    def compute(key: int) -> np.ndarray:
        with lock:
            calls[key] = calls.get(key, 0) + 1
        threading.Event().wait(0.01)  # long enough for other threads to ask for the same key
        return np.full(MiB, key % 256, dtype=np.uint8)

    def ask(key: int) -> int:
        value = cache.get_or_compute(key, lambda: compute(key))
        peak[0] = max(peak[0], cache.nbytes)
        return int(value[0])

    keys = [i // 8 for i in range(8 * 12)]  # 12 keys, 8 callers each, all at once
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(ask, keys)) == [k % 256 for k in keys]
    assert peak[0] <= 4 * MiB and cache.nbytes <= 4 * MiB
    # A key asked again while it was pending was computed once; later re-asks after eviction may recompute.
    assert set(calls) == set(range(12)) and all(n >= 1 for n in calls.values())
    assert sum(calls.values()) < len(keys)


def test_nbytes_counts_arrays_tensors_and_nested_data_once():
    array = np.zeros((256, 256), dtype=np.float32)
    tensor = torch.zeros(1000, dtype=torch.float32)
    value = {"a": array, "again": array, "views": (tensor[:10], tensor[10:]), "text": "x" * 1000}
    measured = nbytes(value)
    assert array.nbytes + tensor.numel() * 4 + 1000 <= measured < array.nbytes + tensor.numel() * 4 + 4000


# -- size settings ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("512MiB", 512 * MiB), ("2GiB", 2 << 30), ("1.5GB", 1_500_000_000), ("64k", 64_000), ("100 MB", 100_000_000),
    ("1048576", MiB), (" 8 kib ", 8192), ("0", 0), ("3B", 3),
])
def test_parse_size_reads_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "12 parsecs", "-1MiB", "1e9", "MiB", "5 M i B"])
def test_parse_size_refuses_anything_else_naming_the_setting(text):
    with pytest.raises(ValueError, match=r"^EXPLANATION_CACHE_BYTES: expected a size such as 512MiB"):
        parse_size(text, "EXPLANATION_CACHE_BYTES")


def test_cache_sizes_come_from_the_environment_with_units():
    config = EngineConfig.from_env({"EMBEDDING_CACHE_BYTES": "64MiB", "EXPLANATION_CACHE_BYTES": "1GB"})
    assert (config.embedding_cache_bytes, config.explanation_cache_bytes) == (64 * MiB, 1_000_000_000)
    assert EngineConfig(embedding_cache_bytes="1 GiB").embedding_cache_bytes == 1 << 30  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="EMBEDDING_CACHE_BYTES='a lot' is invalid"):
        EngineConfig.from_env({"EMBEDDING_CACHE_BYTES": "a lot"})
    settings = ModelSettings.from_env({"MAX_LABEL_CONFIG_BYTES": "2MiB", "PROJECT_MEMORY_BYTES": "16MiB"})
    assert (settings.max_label_config_bytes, settings.project_memory_bytes) == (2 * MiB, 16 * MiB)
    with pytest.raises(ValueError, match="^MAX_LABEL_CONFIG_BYTES: "):
        ModelSettings.from_env({"MAX_LABEL_CONFIG_BYTES": "big"})


# -- per-project memory -------------------------------------------------------------------------------
def test_project_memory_is_bounded_in_bytes():
    memory = ProjectMemory(capacity=1024, max_bytes=4 * MiB)
    schema = "<View>" + "x" * (MiB - 20) + "</View>"  # ~1 MiB each: 16 of them are 16 MiB
    for project in range(16):
        memory.update(str(project), label_config=schema + str(project))
    assert nbytes([memory.get(str(p)) for p in range(16)]) <= 4 * MiB + 64 * 1024
    assert memory.get("15").label_config == schema + "15"  # the newest stays
    assert memory.get("0").label_config is None  # the oldest went
    assert 1 <= len(memory) <= 4


# -- the engine: masks at SAM's resolution, caches in bytes -------------------------------------------
def generated_photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like image of any size: scikit-image's astronaut, scaled and shifted per seed."""
    import skimage.data

    rgb = cv2.resize(skimage.data.astronaut(), (width, height), interpolation=cv2.INTER_LINEAR)
    return np.roll(rgb, seed * 7, axis=1)


@pytest.fixture(scope="module")
def quick_engine(engine):
    from backend.engine import Engine

    return Engine(engine.config.replace(max_detections=3), detector=engine.detector, segmenter=engine.segmenter)


def test_cached_explanation_of_a_large_image_keeps_masks_small(quick_engine):
    rgb = generated_photo(3000, 2000)
    explanation = quick_engine.explain(rgb, "person . flag", box_threshold=0.0, text_threshold=0.0)
    assert explanation.segments
    # 3 full masks alone would be 18 MB; SAM's 256 x 256 logits are 256 KiB each.
    assert nbytes(explanation) < 2 * MiB
    segment = explanation.segments[0]
    assert segment.mask.shape == (2000, 3000) and segment.mask.dtype == bool
    assert segment.area == int(segment.mask.sum())
    small = segment.mask_source.resized(200, 300)
    big = cv2.resize(segment.mask.astype(np.float32), (300, 200), interpolation=cv2.INTER_AREA) > 0.5
    assert np.mean(small == big) > 0.95  # the same mask at another size (random weights: ragged edges)


def test_engine_caches_stay_within_their_byte_budgets(quick_engine):
    from backend.engine import Engine

    engine = Engine(quick_engine.config.replace(embedding_cache_bytes=80 * MiB, explanation_cache_bytes=MiB,
                                                embedding_cache_size=100, explanation_cache_size=100),
                    detector=quick_engine.detector, segmenter=quick_engine.segmenter)
    for seed in range(5):
        engine.explain(generated_photo(320, 240, seed), "person", box_threshold=0.0, text_threshold=0.0)
    for cache, budget in ((engine._sam_embeddings, 40 * MiB), (engine._dino_features, 40 * MiB),
                          (engine._explanations, MiB)):
        assert 0 < cache.nbytes <= budget
    assert len(engine._sam_embeddings) < 5 and len(engine._explanations) < 5


# -- HTTP: responses sized for viewing, schemas capped ------------------------------------------------
def test_explain_of_a_large_image_answers_a_few_mb_at_working_size(quick_engine):
    from backend._wsgi import ServerSettings, create_app
    from explain_ui.views import segments_from_json

    rgb = generated_photo(3000, 2000, seed=1)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    client = create_app(engine=quick_engine, settings=ServerSettings(load_on_start=False)).test_client()
    response = client.post("/api/explain", data={"image": (io.BytesIO(buffer.getvalue()), "big.png"),
                                                  "prompt": "person . flag", "box_threshold": "0",
                                                  "text_threshold": "0"}, content_type="multipart/form-data")
    assert response.status_code == 200, response.get_json()
    assert len(response.data) < 2 * MiB  # was ~80 MB: every map and mask at 3000 x 2000
    body = response.get_json()
    assert (body["width"], body["height"], body["mask_width"], body["mask_height"]) == (3000, 2000, 1024, 683)
    assert body["segments"] and "mask_rle" not in body["segments"][0]

    def size(png: str) -> tuple[int, int]:
        import base64

        return Image.open(io.BytesIO(base64.b64decode(png))).size

    assert size(body["segments"][0]["mask_png"]) == (1024, 683)
    # Maps are token grids whatever the photo's size; the page draws them at its own working size.
    assert {size(b["map_png"]) for b in body["encoder"]["blocks"]} == {(64, 64)}
    assert {size(s["maps"]["decoder_png"]) for s in body["segments"]} == {(64, 64)}
    # The explain page scales the masks back to the photo it shows.
    segments = segments_from_json(body["segments"], rgb)
    assert segments[0].mask.shape == (2000, 3000)
    assert segments[0].area == pytest.approx(body["segments"][0]["area"], rel=0.05)


def test_setup_and_predict_refuse_a_labeling_config_over_the_limit(quick_engine):
    from backend._wsgi import ServerSettings, create_app

    client = create_app(engine=quick_engine, settings=ServerSettings(load_on_start=False)).test_client()
    schema = ('<View><Image name="image" value="$image"/><BrushLabels name="m" toName="image">'
              + "".join(f'<Label value="label number {i:07d} with a long name"/>' for i in range(25_000))
              + "</BrushLabels></View>")
    assert len(schema) > MiB
    setup = client.post("/setup", json={"project": "1.1", "schema": schema})
    assert setup.status_code == 400 and "MAX_LABEL_CONFIG_BYTES" in setup.get_json()["error"]
    assert "1,048,576" in setup.get_json()["error"]
    predict = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "x"}}], "project": "1.1",
                                            "label_config": schema})
    assert predict.status_code == 400 and "MAX_LABEL_CONFIG_BYTES" in predict.get_json()["error"]
