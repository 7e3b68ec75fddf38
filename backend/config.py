"""Engine configuration: model variants, file names, architecture overrides, thresholds.

Everything can come from a JSON file (``ENGINE_CONFIG=path``) and/or environment variables; the
environment wins. Relative paths in a JSON file are resolved against the file's folder, so a model
cache with its own ``engine.json`` (as ``python -m tests.tiny_models`` writes) is self-contained.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = REPO_ROOT / "model_cache"

# Official file names of each variant (listed with URLs and sha256 in model_cache/manifest.json).
SAM_CHECKPOINTS = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_t": "mobile_sam.pt",
}
DINO_CHECKPOINTS = {
    "swint_ogc": "groundingdino_swint_ogc.pth",
    "swinb": "groundingdino_swinb_cogcoor.pth",
}
# Config files shipped inside the groundingdino-py package.
DINO_CONFIGS = {
    "swint_ogc": "GroundingDINO_SwinT_OGC.py",
    "swinb": "GroundingDINO_SwinB_cfg.py",
}
TEXT_ENCODER_DIR = "bert-base-uncased"

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


class ConfigError(ValueError):
    """A configuration value is missing or malformed."""


@dataclass(frozen=True)
class EngineConfig:
    cache_dir: Path = DEFAULT_CACHE_DIR
    sam_variant: str = "vit_b"
    sam_checkpoint: str | None = None  # file name in cache_dir or absolute path; default by variant
    # build_sam hyper-parameters for custom/fine-tuned SAMs: encoder_embed_dim, encoder_depth,
    # encoder_num_heads, encoder_global_attn_indexes.
    sam_arch: dict[str, Any] | None = None
    dino_variant: str = "swint_ogc"
    dino_checkpoint: str | None = None
    dino_config: str | None = None  # SLConfig .py; default: the one shipped for the variant
    # Overrides of SLConfig keys (e.g. enc_layers, hidden_dim); "swin" holds the Swin backbone's
    # embed_dim / depths / num_heads / window_size for backbones the package has no name for.
    dino_arch: dict[str, Any] | None = None
    text_encoder: str = TEXT_ENCODER_DIR  # folder in cache_dir (or absolute) with a BERT model
    dino_image_size: int = 800  # shorter side Grounding DINO sees, as in groundingdino's inference
    dino_max_size: int = 1333
    device: str = "auto"  # auto -> cuda if available else cpu
    precision: str = "auto"  # auto -> fp32 on cpu, bf16 on cuda (where supported)
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    nms_iou: float = 0.5
    max_detections: int = 100
    max_image_pixels: int = 64_000_000  # larger images are refused (decompression bombs)
    embedding_cache_size: int = 8  # images whose SAM/DINO features stay cached for re-prompts
    # Record attention while segmenting so explanations need no second run (costs ~32 MiB per cached
    # vit image for the last global block's matrix).
    explanations: bool = True
    explanation_cache_size: int = 16  # entries hold the masks (H x W bool each)
    # On CPU, keep freed memory in the process heap for reuse (backend/heap.py): faster, but the
    # resident size stays near its peak.
    reuse_freed_memory: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sam_variant not in SAM_CHECKPOINTS:
            raise ConfigError(f"SAM_VARIANT must be one of {sorted(SAM_CHECKPOINTS)}, got {self.sam_variant!r}")
        if self.dino_variant not in DINO_CHECKPOINTS:
            raise ConfigError(
                f"GROUNDING_DINO_VARIANT must be one of {sorted(DINO_CHECKPOINTS)}, got {self.dino_variant!r}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"PRECISION must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("box_threshold", "text_threshold", "nms_iou"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be within [0, 1], got {value}")
        if not 0 < self.dino_image_size <= self.dino_max_size:
            raise ConfigError("GROUNDING_DINO_IMAGE_SIZE must be positive and at most GROUNDING_DINO_MAX_SIZE, "
                              f"got {self.dino_image_size} and {self.dino_max_size}")
        if self.max_detections < 1:
            raise ConfigError(f"max_detections must be >= 1, got {self.max_detections}")

    # -- resolved paths ----------------------------------------------------------------------
    def _in_cache(self, name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() else self.cache_dir / path

    @property
    def sam_checkpoint_path(self) -> Path:
        return self._in_cache(self.sam_checkpoint or SAM_CHECKPOINTS[self.sam_variant])

    @property
    def dino_checkpoint_path(self) -> Path:
        return self._in_cache(self.dino_checkpoint or DINO_CHECKPOINTS[self.dino_variant])

    @property
    def text_encoder_path(self) -> Path:
        return self._in_cache(self.text_encoder)

    @property
    def dino_config_path(self) -> Path:
        if self.dino_config:
            return self._in_cache(self.dino_config)
        import groundingdino

        return Path(groundingdino.__file__).parent / "config" / DINO_CONFIGS[self.dino_variant]

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> "EngineConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"engine config file not found: {path}") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"engine config file {path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"engine config file {path} must hold a JSON object")
        data.setdefault("cache_dir", ".")
        cache_dir = Path(data["cache_dir"])
        data["cache_dir"] = cache_dir if cache_dir.is_absolute() else (path.parent / cache_dir).resolve()
        data.update(overrides)
        return cls._from_mapping(data, source=str(path))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "EngineConfig":
        """ENGINE_CONFIG (JSON file) first, then the individual variables below on top."""
        env = os.environ if env is None else env
        overrides: dict[str, Any] = {}
        for key, (name, parse) in _ENV_FIELDS.items():
            if env.get(key, "") != "":
                try:
                    overrides[name] = parse(env[key])
                except (ValueError, json.JSONDecodeError) as exc:
                    raise ConfigError(f"environment variable {key}={env[key]!r} is invalid: {exc}") from exc
        if env.get("ENGINE_CONFIG"):
            return cls.from_file(env["ENGINE_CONFIG"], **overrides)
        return cls._from_mapping(overrides, source="environment")

    @classmethod
    def _from_mapping(cls, data: Mapping[str, Any], source: str) -> "EngineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown engine config keys in {source}: {unknown}")
        values = dict(data)
        if "cache_dir" in values:
            values["cache_dir"] = Path(values["cache_dir"])
        return cls(**values)


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def parse_switch(text: str) -> bool:
    """An on/off setting's text; ValueError for anything else (a typo must not silently mean on)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected one of 1/true/yes/on or 0/false/no/off")


_ENV_FIELDS: dict[str, tuple[str, Any]] = {
    "MODEL_CACHE_DIR": ("cache_dir", Path),
    "SAM_VARIANT": ("sam_variant", str),
    "SAM_CHECKPOINT": ("sam_checkpoint", str),
    "SAM_ARCH": ("sam_arch", _json_object),
    "GROUNDING_DINO_VARIANT": ("dino_variant", str),
    "GROUNDING_DINO_CHECKPOINT": ("dino_checkpoint", str),
    "GROUNDING_DINO_CONFIG": ("dino_config", str),
    "GROUNDING_DINO_ARCH": ("dino_arch", _json_object),
    "TEXT_ENCODER": ("text_encoder", str),
    "GROUNDING_DINO_IMAGE_SIZE": ("dino_image_size", int),
    "GROUNDING_DINO_MAX_SIZE": ("dino_max_size", int),
    "DEVICE": ("device", str),
    "PRECISION": ("precision", str),
    "BOX_THRESHOLD": ("box_threshold", float),
    "TEXT_THRESHOLD": ("text_threshold", float),
    "NMS_IOU": ("nms_iou", float),
    "MAX_DETECTIONS": ("max_detections", int),
    "MAX_IMAGE_PIXELS": ("max_image_pixels", int),
    "EMBEDDING_CACHE_SIZE": ("embedding_cache_size", int),
    "EXPLANATIONS": ("explanations", parse_switch),
    "EXPLANATION_CACHE_SIZE": ("explanation_cache_size", int),
    "REUSE_FREED_MEMORY": ("reuse_freed_memory", parse_switch),
}
