"""Shared fixtures: a tiny model cache (real architectures, random weights) and real photos."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Backends the tests start (in process or as subprocesses) keep their job store in a folder of this
# run, never in the checkout's data/ where a stale job would resume in the next run.
if "DATA_DIR" not in os.environ and "JOBS_DB" not in os.environ:
    os.environ["DATA_DIR"] = tempfile.mkdtemp(prefix="gsam-test-data-")
# PRECISION=auto is bf16 on CPUs with native bf16 (backend/models.py), so results would depend on the
# machine; the suite's checks against the fp32 reference chain are fp32 claims. The engines the tests
# build, in process and in the backends they start, run fp32 unless PRECISION says otherwise
# (tests/test_precision.py covers bf16 and the auto rule).
os.environ.setdefault("PRECISION", "fp32")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A model cache written by ``python -m tests.tiny_models``; reused from TINY_MODEL_CACHE if set."""
    from tests.tiny_models import write_cache

    existing = os.environ.get("TINY_MODEL_CACHE")
    if existing and (Path(existing) / "engine.json").is_file():
        return Path(existing)
    out = tmp_path_factory.mktemp("tiny_model_cache")
    write_cache(out)
    return out


@pytest.fixture(scope="session")
def engine_config(tiny_cache):
    from backend.config import EngineConfig

    # PRECISION (pinned to fp32 above unless set) and RUNTIME=torch|openvino (default: the engine's auto,
    # OpenVINO on CPU) choose how the engine tests run.
    runtime = os.environ.get("RUNTIME")
    return EngineConfig.from_file(tiny_cache / "engine.json", precision=os.environ["PRECISION"],
                                  **({"runtime": runtime} if runtime else {}))


@pytest.fixture(scope="session")
def engine(engine_config):
    from backend.engine import Engine

    return Engine(engine_config)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()  # 512 x 512 RGB photo


@pytest.fixture(scope="session")
def chelsea() -> np.ndarray:
    import skimage.data

    return skimage.data.chelsea()  # 300 x 451 RGB photo (non-square: catches transposed geometry)


# Real Label Studio fixture (`label_studio`), see tests/conftest_ls.py; unit/integration/e2e markers
# from each test's fixtures, see tests/markers.py.
pytest_plugins = ["tests.conftest_ls", "tests.conftest_pg", "tests.markers"]


@pytest.fixture(scope="session")
def ops_library(tmp_path_factory):
    """The OpenVINO operations library (backend/openvino_ops.py), built for this run. Not skipped where it
    can't build: every machine this suite runs on has a C++ compiler, and the product uses it there."""
    from backend.openvino_ops import load

    return load(tmp_path_factory.mktemp("openvino_ops"))
