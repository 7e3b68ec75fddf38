"""Converting a torch module to OpenVINO once and keeping the result on disk, for every converted model.

Conversion goes through ``torch.export`` (seconds and about a GB for SAM vit_b; tracing took minutes
and 9-14 GB) and ``openvino.convert_model``; the result is saved as OpenVINO IR (f32 weights; f16 for
bf16 inference) in ``cache_folder(config)``, named by a digest of the key (the checkpoint's sha256,
the architecture, the OpenVINO version, the precision, the graph's kind and version), so a warm start
reads the file and never converts again. Writes are atomic (renamed into place, .xml last); a cache
file that can't be read is converted again and replaced. Users: SAM's image encoder
(``openvino_encoder``) and Grounding DINO's text half (``dino_runtime``) and image half
(``dino_image_runtime``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import openvino as ov
import torch
from torch import nn

from .encoder_runtime import describe_error

if TYPE_CHECKING:
    from .config import EngineConfig
    from .openvino_ops import OpsLibrary

logger = logging.getLogger(__name__)

PRECISION_HINTS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


class ConversionError(RuntimeError):
    """A module could not be exported or converted to OpenVINO."""


class ConvertedModelKey(Protocol):
    """Everything a converted model depends on (``openvino_encoder.CacheKey``, ``dino_runtime.DinoGraphKey``)."""

    @property
    def what(self) -> str:
        """The model in words, for log lines ("SAM's image encoder")."""
        ...

    @property
    def precision(self) -> str:
        """OpenVINO inference precision hint: f32, bf16, f16 (not f32: the IR keeps f16 weights)."""
        ...

    @property
    def stem(self) -> str:
        """The cache file's name without suffix: readable parts and a digest of ``as_json``."""
        ...

    def as_json(self) -> dict[str, object]:
        """The key as written beside the IR (a cache file is used only when this matches)."""
        ...


def cache_folder(config: EngineConfig) -> Path:
    """Where converted models live: ``OPENVINO_CACHE_DIR`` if set, else ``openvino/`` beside the SAM
    checkpoint; when that folder can't be written, the user's cache folder (logged)."""
    if config.openvino_cache_dir is not None:
        return Path(config.openvino_cache_dir)
    beside = Path(config.sam_checkpoint_path).parent / "openvino"
    if _writable(beside):
        return beside
    fallback = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "grounded-sam" / "openvino"
    logger.info("%s is read-only; converted OpenVINO models are cached in %s (set OPENVINO_CACHE_DIR to choose)",
                beside, fallback)
    return fallback


def _writable(folder: Path) -> bool:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return os.access(existing, os.W_OK | os.X_OK)


@dataclass(frozen=True)
class Conversion:
    """How one graph was obtained at load."""

    path: Path | None  # the IR's .xml (None: converted but the folder could not be written)
    converted: bool  # True: exported and converted in this load; False: read from the cache
    seconds: float  # export + convert (or read) time
    size_bytes: int  # IR on disk (.xml + .bin)


def convert(module: nn.Module, example: tuple[torch.Tensor, ...], dynamic_shapes: Any = None,
            export_options: Mapping[str, Any] | None = None, ops: OpsLibrary | None = None) -> ov.Model:
    """torch.export of ``module`` at the example inputs (``dynamic_shapes``: torch.export's, for sizes
    that vary between calls; None: the examples' shapes; ``export_options``: further keyword arguments
    of torch.export.export), then openvino.convert_model (``ops``: the library whose operations the
    module's custom torch ops become)."""
    try:
        with torch.no_grad():
            exported = torch.export.export(module, example, dynamic_shapes=dynamic_shapes, **(export_options or {}))
        if ops is None:
            return ov.convert_model(exported)
        return ops.connect_outputs(ov.convert_model(exported, extension=ops.conversion_extensions()))
    except Exception as exc:
        raise ConversionError(f"{type(module).__name__} did not convert ({describe_error(exc)})") from exc


def _ir_size(xml: Path) -> int:
    return sum(p.stat().st_size for p in (xml, xml.with_suffix(".bin")) if p.is_file())


def _core(ops: OpsLibrary | None) -> ov.Core:
    """A Core that reads IR holding ``ops``' operations (a plain one for None)."""
    return ops.add_to(ov.Core()) if ops else ov.Core()


def _read_cached(xml: Path, key: ConvertedModelKey, ops: OpsLibrary | None) -> ov.Model:
    meta = json.loads(xml.with_suffix(".json").read_text())
    if meta.get("key") != json.loads(json.dumps(key.as_json(), default=str)):
        raise ValueError("its key file does not match")
    if xml.with_suffix(".bin").stat().st_size != meta.get("bin_bytes"):
        raise ValueError("its weights file has the wrong size")
    return _core(ops).read_model(xml)


def _save(model: ov.Model, xml: Path, key: ConvertedModelKey, seconds: float, ops: OpsLibrary | None) -> Path | None:
    """Write the IR beside a key file, each renamed into place (.xml last: a present .xml is complete)."""
    try:
        xml.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=xml.parent, prefix=".converting-") as tmp:
            part = Path(tmp) / xml.name
            ov.save_model(model, part, compress_to_fp16=False)  # f16 weights would change f32 numbers
            if key.precision != "f32":
                # bf16 inference rounds the weights further anyway: store them at half the size. (A model
                # fresh from convert_model keeps f32 whatever compress_to_fp16 says; one read back does not.)
                half = Path(tmp) / "f16" / xml.name
                ov.save_model(_core(ops).read_model(part), half, compress_to_fp16=True)
                part = half
            meta = {"key": key.as_json(), "bin_bytes": part.with_suffix(".bin").stat().st_size,
                    "convert_seconds": round(seconds, 2)}
            part.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=str))
            for suffix in (".bin", ".json", ".xml"):
                os.replace(part.with_suffix(suffix), xml.with_suffix(suffix))
        return xml
    except OSError as exc:
        logger.warning("could not cache the converted %s in %s (%s); it converts again next start",
                       key.what, xml.parent, exc)
        return None


def load_or_convert(module: nn.Module, example: tuple[torch.Tensor, ...], key: ConvertedModelKey,
                    folder: Path, dynamic_shapes: Any = None,
                    export_options: Mapping[str, Any] | None = None,
                    ops: OpsLibrary | None = None) -> tuple[ov.Model, Conversion]:
    """The cached IR for ``key`` if present and sound, else a fresh conversion (then cached).

    An unreadable cache file (truncated, edited, another key) is converted again and replaced.
    ``dynamic_shapes``, ``export_options`` and ``ops`` as ``convert`` (``key`` must tell graphs with and
    without ``ops`` apart). Raises ConversionError when the module does not convert.
    """
    xml = folder / f"{key.stem}.xml"
    if xml.is_file():
        started = time.perf_counter()
        try:
            model = _read_cached(xml, key, ops)
            return model, Conversion(xml, False, time.perf_counter() - started, _ir_size(xml))
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, a conversion replaces it
            logger.warning("cached OpenVINO model %s is unusable (%s); converting again", xml, describe_error(exc))
    started = time.perf_counter()
    model = convert(module, example, dynamic_shapes, export_options, ops)
    seconds = time.perf_counter() - started
    saved = _save(model, xml, key, seconds, ops)
    logger.info("converted %s to OpenVINO in %.1f s (%s)", key.what, seconds, saved or "not cached")
    if saved is not None:
        model = _core(ops).read_model(saved)  # what every warm start will run (f16-stored weights at bf16)
    return model, Conversion(saved, True, seconds, _ir_size(saved) if saved else 0)


def compile_for_cpu(core: ov.Core, model: ov.Model, precision: str) -> ov.CompiledModel:
    """``model`` compiled for the CPU plugin with the inference precision said explicitly (OpenVINO
    would pick bf16 by itself on CPUs with AMX or avx512_bf16; f32 gives torch's numbers to ~1e-5)
    and the threads torch is given."""
    return core.compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
    })


def key_digest(fields: Mapping[str, object]) -> str:
    """A short stable digest of a key's fields (for file names)."""
    import hashlib

    return hashlib.sha256(json.dumps(dict(fields), sort_keys=True, default=str).encode()).hexdigest()[:16]
