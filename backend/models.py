"""Build SAM / MobileSAM / Grounding DINO from their real architecture code and load checkpoints.

Files are read from the model cache only; nothing here reaches the internet.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

from .config import SAM_CHECKPOINTS, EngineConfig

if TYPE_CHECKING:
    # The model classes. Their packages ship no type information, so mypy reads these as Any; the
    # names still say what a function takes or returns (rather than a bare torch.nn.Module, whose
    # submodule attributes mypy can only see as ``Tensor | Module``).
    from groundingdino.models.GroundingDINO.groundingdino import GroundingDINO
    from groundingdino.util.slconfig import SLConfig
    from mobile_sam.modeling import Sam as MobileSam
    from segment_anything.modeling import Sam

    SamModel: TypeAlias = Sam | MobileSam  # MobileSAM's Sam has segment_anything's interface

logger = logging.getLogger(__name__)

# segment_anything's build_sam_vit_{h,l,b} hyper-parameters.
SAM_ARCHS: dict[str, dict[str, Any]] = {
    "vit_h": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                  encoder_global_attn_indexes=[7, 15, 23, 31]),
    "vit_l": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                  encoder_global_attn_indexes=[5, 11, 17, 23]),
    "vit_b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                  encoder_global_attn_indexes=[2, 5, 8, 11]),
}
OFFICIAL_FILE_NAMES = frozenset(SAM_CHECKPOINTS.values()) | {
    "groundingdino_swint_ogc.pth", "groundingdino_swinb_cogcoor.pth"}

# State-dict keys a Grounding DINO checkpoint may lack without harm (buffers rebuilt at init).
_DINO_IGNORABLE_MISSING = ("bert.embeddings.position_ids", "bert.pooler.")


class ModelLoadError(RuntimeError):
    """A checkpoint exists but can't be loaded into the configured architecture."""


def resolve_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"DEVICE={requested} but CUDA is not available on this machine")
    return device


# CPU flags (as /proc/cpuinfo names them) that give bf16 matrix instructions, best first. With them
# torch's bf16 matmuls run natively (here: 440 vs 190 GFLOP/s fp32 with avx512_bf16; 1884 vs 273 with
# AMX); without them bf16 is emulated and ~100x slower than fp32 (bench/README.md).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_kind(flags: Iterable[str]) -> str | None:
    """The first of ``NATIVE_BF16_FLAGS`` among a CPU's ``flags``, or None (no native bf16)."""
    have = set(flags)
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in have), None)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags from /proc/cpuinfo (Linux: "flags" on x86, "Features" on arm64); empty
    where there is none to read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def resolve_dtype(precision: str, device: torch.device, flags: Iterable[str] | None = None) -> torch.dtype:
    """The dtype PRECISION means on ``device``; ``flags`` are the CPU's (default: this machine's).

    "auto" is bf16 on a CPU with native bf16 (AMX or AVX-512 BF16: SAM's masks keep a mean IoU
    >= 0.98 against fp32 on the same boxes, ``python -m bench.precision``) and fp32 on other CPUs; on
    GPUs bf16 where supported, fp16 otherwise.
    """
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type != "cuda":
        return torch.bfloat16 if cpu_bf16_kind(cpu_flags() if flags is None else flags) else torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_precision(precision: str, device: torch.device, flags: Iterable[str] | None = None) -> str:
    """``resolve_dtype``'s choice by name: "fp32", "bf16" or "fp16"."""
    dtype = resolve_dtype(precision, device, flags)
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def effective_precision(config: EngineConfig) -> str:
    """The precision the engine will run in on this machine ("auto" resolved): part of the model version."""
    try:
        device = resolve_device(config.device)
    except ModelLoadError:
        return config.precision  # the engine can't load here; its version names the setting as given
    return resolve_precision(config.precision, device)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """torch.load on CPU, tensors only; only our official files may fall back to full unpickling."""
    if not path.is_file():
        raise ModelLoadError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure
        if path.name not in OFFICIAL_FILE_NAMES:
            raise ModelLoadError(
                f"can't load checkpoint {path} as plain tensors ({exc.__class__.__name__}: {exc}); "
                "save it with torch.save(model.state_dict(), path)"
            ) from exc
        logger.warning("%s holds non-tensor objects; loading it with full unpickling", path.name)
        return torch.load(path, map_location="cpu", weights_only=False)


def build_sam_architecture(config: EngineConfig) -> SamModel:
    """The SAM (or MobileSAM) architecture of ``config`` with freshly initialised weights."""
    if config.sam_variant == "vit_t":
        if config.sam_arch:
            raise ModelLoadError("sam_arch overrides are for vit_h/vit_l/vit_b; MobileSAM's TinyViT is fixed")
        from mobile_sam.build_sam import build_sam_vit_t

        sam = build_sam_vit_t(checkpoint=None)
    else:
        from segment_anything.build_sam import _build_sam

        arch = {**SAM_ARCHS[config.sam_variant], **(config.sam_arch or {})}
        unknown = set(arch) - set(SAM_ARCHS["vit_b"])
        if unknown:
            raise ModelLoadError(f"unknown sam_arch keys {sorted(unknown)}; allowed: {sorted(SAM_ARCHS['vit_b'])}")
        sam = _build_sam(checkpoint=None, **arch)
    return sam


def build_sam(config: EngineConfig) -> SamModel:
    """The SAM (or MobileSAM) architecture of ``config``, with its checkpoint loaded, in eval mode."""
    sam = build_sam_architecture(config)
    path = config.sam_checkpoint_path
    state = load_state_dict(path)
    try:
        sam.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"checkpoint {path} does not match SAM architecture {config.sam_variant}"
            f"{' with sam_arch ' + str(config.sam_arch) if config.sam_arch else ''}: {str(exc)[:500]}"
        ) from exc
    return sam.eval()


# Held while Grounding DINO is built: the build swaps process-wide state (sys.stdout, groundingdino's
# Swin builder) that two threads' builds must not interleave.
_build_lock = threading.RLock()


@contextlib.contextmanager
def _custom_swin(swin_arch: dict[str, Any] | None) -> Iterator[None]:
    """Let groundingdino's build_backbone build a Swin with our hyper-parameters.

    groundingdino only knows five named Swins (a dict local to build_swin_transformer), so custom or
    tiny backbones are built by swapping that function for the duration of the build.
    """
    if not swin_arch:
        yield
        return
    from groundingdino.models.GroundingDINO.backbone import backbone as backbone_module
    from groundingdino.models.GroundingDINO.backbone.swin_transformer import SwinTransformer

    def build_swin_transformer(modelname: str, pretrain_img_size: int, **kwargs: Any) -> SwinTransformer:
        return SwinTransformer(pretrain_img_size=pretrain_img_size, **{**swin_arch, **kwargs})

    with _build_lock:
        original = backbone_module.build_swin_transformer
        backbone_module.build_swin_transformer = build_swin_transformer
        try:
            yield
        finally:
            backbone_module.build_swin_transformer = original


def read_dino_config(path: Path) -> SLConfig:
    """groundingdino's ``SLConfig`` from its ``.py`` file (``_base_`` files merged as groundingdino
    merges them), read without ``SLConfig.fromfile``.

    ``fromfile`` imports a ``.py`` config by ``sys.path.insert(0, tmpdir)`` ... ``sys.path.pop(0)``: the
    pop takes whatever another thread inserted in between. In the server the engine loads in a thread
    while the Ray job runner's ``import ray`` puts Ray's vendored packages (psutil) at ``sys.path[0]``;
    the pop removed them and ``import ray`` failed. Executing the file with ``runpy`` leaves ``sys.path``
    alone. Other forms (``.json``, ``.yaml``) never touch ``sys.path`` and go to ``fromfile``.

    Raises:
        ModelLoadError: the file can't be read or run (naming it and why).
    """
    import runpy

    from groundingdino.util.slconfig import BASE_KEY, SLConfig

    if path.suffix.lower() != ".py":
        return SLConfig.fromfile(str(path))

    def values(file: Path) -> dict[str, Any]:
        try:
            names = runpy.run_path(str(file), run_name="grounding_dino_config")
        except Exception as exc:  # a syntax error or a failing statement in an operator's file
            raise ModelLoadError(f"Grounding DINO config {file} could not be read: {type(exc).__name__}: {exc}"
                                 ) from exc
        own = {key: value for key, value in names.items() if not key.startswith("__")}
        bases = own.pop(BASE_KEY, None)
        if bases is None:
            return own
        inherited: dict[str, Any] = {}
        for base in bases if isinstance(bases, list) else [bases]:
            base_values = values(file.parent / base)
            if twice := sorted(inherited.keys() & base_values.keys()):  # as fromfile: bases must not overlap
                raise ModelLoadError(f"Grounding DINO config {file}: its _base_ files both set {', '.join(twice)}")
            inherited.update(base_values)
        return SLConfig._merge_a_into_b(own, inherited)

    return SLConfig(values(path), filename=str(path))


def build_grounding_dino_architecture(config: EngineConfig) -> GroundingDINO:
    """Grounding DINO from its SLConfig file and the local text encoder; detection weights fresh."""
    from .weights import force_offline

    force_offline()
    from groundingdino.models import build_model

    text_encoder = config.text_encoder_path
    if not (text_encoder / "config.json").is_file():
        raise ModelLoadError(f"text encoder folder {text_encoder} has no config.json")
    args = read_dino_config(config.dino_config_path)
    arch = dict(config.dino_arch or {})
    swin_arch = arch.pop("swin", None)
    for key, value in arch.items():
        setattr(args, key, value)
    args.device = "cpu"
    # groundingdino treats a folder path as a local BERT; the name "bert-base-uncased" would go to the hub.
    args.text_encoder_type = str(text_encoder)
    # groundingdino prints as it builds; redirect_stdout swaps the process's sys.stdout, so two builds
    # in two threads would restore each other's (closed) devnull: one build at a time.
    with _build_lock, _custom_swin(swin_arch), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        return build_model(args)


def build_grounding_dino(config: EngineConfig) -> GroundingDINO:
    """Grounding DINO from its SLConfig file, text encoder from the local cache, checkpoint loaded."""
    from groundingdino.util.misc import clean_state_dict

    model = build_grounding_dino_architecture(config)
    path = config.dino_checkpoint_path
    checkpoint = load_state_dict(path)
    state = clean_state_dict(checkpoint["model"] if "model" in checkpoint else checkpoint)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(_DINO_IGNORABLE_MISSING)]
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"checkpoint {path} does not match Grounding DINO {config.dino_variant}"
            f"{' with dino_arch ' + str(config.dino_arch) if config.dino_arch else ''}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}"
        )
    return model.eval()


def hollow_weights(module: torch.nn.Module) -> None:
    """Free ``module``'s parameters and buffers in place, keeping its structure and shapes: each tensor
    becomes one zero broadcast to its shape (one element stored), so ``.eval()``/``.to()`` and code
    reading shapes or plain attributes (a tokenizer, ``num_queries``) still work."""
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            tensor.data = torch.zeros((), dtype=tensor.dtype, device=tensor.device).expand(tensor.shape)
