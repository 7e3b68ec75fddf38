"""EngineConfig from the environment: the settings added for speed, and their validation."""

from __future__ import annotations

import pytest


def test_engine_config_switch_from_environment():
    from backend.config import EngineConfig

    assert EngineConfig.from_env({}).reuse_freed_memory is True
    assert EngineConfig.from_env({"REUSE_FREED_MEMORY": "0"}).reuse_freed_memory is False
    assert EngineConfig.from_env({"EXPLANATIONS": "Off"}).explanations is False


def test_unknown_switch_value_is_refused_by_name():
    from backend.config import ConfigError, EngineConfig

    with pytest.raises(ConfigError, match="REUSE_FREED_MEMORY='maybe' is invalid"):
        EngineConfig.from_env({"REUSE_FREED_MEMORY": "maybe"})


def test_grounding_dino_input_size_from_environment():
    from backend.config import ConfigError, EngineConfig

    config = EngineConfig.from_env({"GROUNDING_DINO_IMAGE_SIZE": "640", "GROUNDING_DINO_MAX_SIZE": "1066"})
    assert (config.dino_image_size, config.dino_max_size) == (640, 1066)
    with pytest.raises(ConfigError, match="GROUNDING_DINO_IMAGE_SIZE"):
        EngineConfig.from_env({"GROUNDING_DINO_IMAGE_SIZE": "2000"})


def test_freed_memory_bound_from_environment_and_file():
    from backend.config import ConfigError, EngineConfig

    assert EngineConfig.from_env({}).freed_memory_kept is None  # auto
    assert EngineConfig.from_env({"FREED_MEMORY_KEPT": "AUTO"}).freed_memory_kept is None
    assert EngineConfig.from_env({"FREED_MEMORY_KEPT": "512MiB"}).freed_memory_kept == 512 << 20
    assert EngineConfig(freed_memory_kept="1GiB").freed_memory_kept == 1 << 30  # type: ignore[arg-type]
    for bad in ("lots", "-5MiB"):
        with pytest.raises(ConfigError, match="FREED_MEMORY_KEPT"):
            EngineConfig.from_env({"FREED_MEMORY_KEPT": bad})
    with pytest.raises(ConfigError, match="FREED_MEMORY_KEPT"):
        EngineConfig(freed_memory_kept=-1)
