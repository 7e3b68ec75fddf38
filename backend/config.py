"""Engine configuration: model variants, file names, architecture overrides, thresholds.

Everything can come from a JSON file (``ENGINE_CONFIG=path``) and/or environment variables; the
environment wins. Relative paths in a JSON file are resolved against the file's folder, so a model
cache with its own ``engine.json`` (as ``python -m tests.tiny_models`` writes) is self-contained.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
# What runs SAM's image encoder and Grounding DINO's text half: auto -> openvino on CPU where it converts, else torch.
RUNTIMES = ("auto", "torch", "openvino")


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
    precision: str = "auto"  # auto -> bf16 on a CPU with AMX/AVX-512 BF16, else fp32; cuda: bf16 (fp16 if unsupported)
    runtime: str = "auto"  # RUNTIME: SAM image encoder and DINO text half on torch or OpenVINO (RUNTIMES)
    # OPENVINO_CACHE_DIR: where converted models are kept; default openvino/ beside the SAM checkpoint
    # (the user's cache folder when that is read-only).
    openvino_cache_dir: Path | None = None
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    nms_iou: float = 0.5
    max_detections: int = 100
    max_image_pixels: int = 64_000_000  # larger images are refused (decompression bombs)
    embedding_cache_size: int = 8  # images whose SAM/DINO features stay cached for re-prompts
    # Bytes those features may hold (split evenly between SAM's and Grounding DINO's); "512MiB" works
    # in a JSON file too. A vit SAM image is ~36 MiB with its attention, a DINO image up to ~45 MiB.
    embedding_cache_bytes: int = 512 << 20
    # Record attention while segmenting so explanations need no second run (costs ~32 MiB per cached
    # vit image for the last global block's matrix).
    explanations: bool = True
    explanation_cache_size: int = 16  # image + prompt results kept for the explain UI
    # Bytes they may hold: masks are kept as SAM's 256 x 256 logits (256 KiB each) whatever the image size.
    explanation_cache_bytes: int = 256 << 20
    # On CPU, keep freed memory in the process heap for reuse (backend/heap.py): faster, but the
    # resident size stays near its peak.
    reuse_freed_memory: bool = True
    # With freed memory kept: the most the heap may hold free after a task before it is handed back
    # (fragmentation otherwise grows it task after task). None: auto, from the first task's working set.
    freed_memory_kept: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("embedding_cache_bytes", "explanation_cache_bytes"):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, parse_size(value) if isinstance(value, str) else int(value))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{name} is invalid: {exc}") from exc
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {value!r}")
        kept = self.freed_memory_kept
        try:
            kept = parse_size_or_auto(kept, "FREED_MEMORY_KEPT") if isinstance(kept, str) else kept
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if kept is not None and (isinstance(kept, bool) or not isinstance(kept, int) or kept < 0):
            raise ConfigError(f"FREED_MEMORY_KEPT must be 'auto' or a size >= 0, got {self.freed_memory_kept!r}")
        object.__setattr__(self, "freed_memory_kept", kept)
        if self.sam_variant not in SAM_CHECKPOINTS:
            raise ConfigError(f"SAM_VARIANT must be one of {sorted(SAM_CHECKPOINTS)}, got {self.sam_variant!r}")
        if self.dino_variant not in DINO_CHECKPOINTS:
            raise ConfigError(
                f"GROUNDING_DINO_VARIANT must be one of {sorted(DINO_CHECKPOINTS)}, got {self.dino_variant!r}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"PRECISION must be one of {PRECISIONS}, got {self.precision!r}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"RUNTIME must be one of {RUNTIMES}, got {self.runtime!r}")
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

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> EngineConfig:
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
    def from_env(cls, env: Mapping[str, str] | None = None) -> EngineConfig:
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
    def _from_mapping(cls, data: Mapping[str, Any], source: str) -> EngineConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown engine config keys in {source}: {unknown}")
        values = dict(data)
        for name in ("cache_dir", "openvino_cache_dir"):
            if values.get(name) is not None:
                values[name] = Path(values[name])
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


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
               "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4,
               "tib": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str, name: str | None = None) -> int:
    """A size in bytes from ``"512MiB"``, ``"1.5GB"``, ``"64k"`` or ``"1048576"`` (KiB/MiB/GiB/TiB are
    powers of 1024, k/KB/M/MB/G/GB/T/TB powers of 1000). ValueError for anything else, naming the
    setting ``name`` when given."""
    match = _SIZE.fullmatch(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        where = f"{name}: " if name else ""
        raise ValueError(f"{where}expected a size such as 512MiB, 2GiB, 100MB or a number of bytes, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_size_or_auto(text: str, name: str | None = None) -> int | None:
    """None for ``"auto"`` (any case), else ``parse_size``."""
    return None if str(text).strip().lower() == "auto" else parse_size(text, name)


def env_size(env: Mapping[str, str], name: str, default: int) -> int:
    """The size setting ``name`` from ``env`` (``parse_size``), ``default`` when unset or empty."""
    text = env.get(name, "").strip()
    return default if not text else parse_size(text, name)


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
    "RUNTIME": ("runtime", str),
    "OPENVINO_CACHE_DIR": ("openvino_cache_dir", Path),
    "BOX_THRESHOLD": ("box_threshold", float),
    "TEXT_THRESHOLD": ("text_threshold", float),
    "NMS_IOU": ("nms_iou", float),
    "MAX_DETECTIONS": ("max_detections", int),
    "MAX_IMAGE_PIXELS": ("max_image_pixels", int),
    "EMBEDDING_CACHE_SIZE": ("embedding_cache_size", int),
    "EMBEDDING_CACHE_BYTES": ("embedding_cache_bytes", parse_size),
    "EXPLANATIONS": ("explanations", parse_switch),
    "EXPLANATION_CACHE_SIZE": ("explanation_cache_size", int),
    "EXPLANATION_CACHE_BYTES": ("explanation_cache_bytes", parse_size),
    "REUSE_FREED_MEMORY": ("reuse_freed_memory", parse_switch),
    "FREED_MEMORY_KEPT": ("freed_memory_kept", lambda text: parse_size_or_auto(text, "FREED_MEMORY_KEPT")),
}
