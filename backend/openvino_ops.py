"""The project's own OpenVINO operations: a C++ library built on first use, and how the converter makes them.

Two operations, each one node where OpenVINO's own ops would write tensors of the sampled or N x N size:

* Grounding DINO's multi-scale deformable attention (``backend/csrc/deformable_attention.cpp``; torch
  side: ``dino_fast.fused_deformable_attention``), instead of GridSample and the Reorders, Multiplies,
  ReduceSums and Transposes around it (bench/README.md: the text half's deformable cores took ~4x the
  kernel's time);
* SAM's global-block attention with the explanation's reductions (``backend/csrc/global_attention.cpp``;
  torch side: ``global_attention``), instead of the capture graph's explicit logits and softmax.

OpenVINO loads operations from a shared library, and none ships for this one, so the library is
compiled here, once per source, OpenVINO version, compiler and CPU, with the C++ compiler the machine
has (``CXX``, else g++ or c++) against the headers in OpenVINO's wheel, and kept beside the converted
graphs (``build``). Building takes a few seconds; a warm start finds the file. Where no compiler
works, ``OpsLibraryError`` says why and the caller exports the grid_sample form instead (slower, same
results up to float rounding).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import openvino as ov

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")  # each operation's file (deformable_attention.cpp, global_attention.cpp, ...)
SOURCE = CSRC / "ops.cpp"  # the library: includes every operation's file (from CSRC), one translation unit
OP_TYPE = "DeformableAttention"  # the C++ class's OPENVINO_OP name
TORCH_OP = "gsam.deformable_attention.default"  # how torch.export names dino_fast.fused_deformable_attention
ATTENTION_OP_TYPE = "GlobalAttention"
FUSION_OP_TYPE = "FusionSoftmax"
FUSION_TORCH_OP = "gsam.fusion_softmax.default"  # how torch.export names fusion_attention.fusion_softmax
# The nodes that a graph compiled at bf16 runs with bf16 inputs (these indices) and outputs (narrow_io).
NARROWED_INPUTS = {OP_TYPE: (0, 3, 4), FUSION_OP_TYPE: (0,)}
# CPU flags under which GlobalAttention's bf16 products run on AMX tiles, or on AVX512-BF16's dot products
AMX_FLAGS = frozenset({"amx_tile", "amx_bf16"})
DOT_BF16_FLAG = "avx512_bf16"
# how torch.export names global_attention's two operations, and whether each returns the matrix
ATTENTION_TORCH_OPS = {"gsam.global_attention.default": False, "gsam.global_attention_matrix.default": True}
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-march=native")  # built where it runs: the CPU's own vector width
BUILD_SECONDS = 180

Bf16Products = Literal["amx", "dot"]
VECTOR_FLAGS = frozenset({"avx512f", "avx512bw"})  # the kernels' AVX-512 paths (elsewhere: plain C++ loops)


def vector_kernels(flags: Iterable[str]) -> bool:
    """Whether the library's kernels run their AVX-512 paths on a CPU with these flags (the library is
    built with -march=native). Where they do not, an operation that only saves passes over memory
    (FusionSoftmax) would lose to OpenVINO's own vectorised nodes, and is not used."""
    return VECTOR_FLAGS <= set(flags)


def bf16_products(flags: Iterable[str]) -> Bf16Products | None:
    """The bf16 products GlobalAttention's kernel runs on a CPU with ``flags``: "amx" (tiles), "dot"
    (AVX512-BF16's vdpbf16ps), or None (its plain f32 path, slower than OpenVINO's and torch's matmuls).

    Follows oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA``, else ``DNNL_MAX_CPU_ISA``) as the kernel does
    (``bf16_products.hpp``), so one setting caps OpenVINO's kernels, torch's and this one: below
    AVX512_CORE_AMX no tiles, below AVX512_CORE_BF16 no bf16 products.
    """
    have = set(flags)
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    tiles_allowed = cap in ("ALL", "DEFAULT") or "AMX" in cap
    dots_allowed = tiles_allowed or any(part in cap for part in ("AVX512_CORE_BF16", "AVX512_CORE_FP16")) \
        or cap.startswith("AVX10")
    if tiles_allowed and AMX_FLAGS <= have and DOT_BF16_FLAG in have:
        return "amx"
    if dots_allowed and DOT_BF16_FLAG in have:
        return "dot"
    return None


_lock = threading.Lock()
_loaded: dict[str, OpsLibrary] = {}  # by toolchain digest


class OpsLibraryError(RuntimeError):
    """The operations library could not be built or loaded here (the message says why)."""


@dataclass(frozen=True)
class OpsLibrary:
    """A built and loaded operations library."""

    path: Path  # the shared library
    built: bool  # True: compiled by this process; False: found from an earlier build
    seconds: float  # compile (or find) time

    def add_to(self, core: ov.Core) -> ov.Core:
        """``core`` able to read IR that holds these operations."""
        core.add_extension(str(self.path))
        return core

    def conversion_extensions(self) -> list[Any]:
        """``openvino.convert_model``'s extensions that turn the exported torch op into this library's node."""
        from openvino.frontend.pytorch import ConversionExtension
        from openvino.utils.node_factory import NodeFactory

        factory = NodeFactory()
        factory.add_extension(str(self.path))

        def deformable_attention(context: Any) -> Any:
            inputs = [*(context.get_input(index) for index in range(5)), context.get_input(7)]  # 7: padding
            attributes = {"heads": int(context.get_values_from_const_input(5)),
                          "points": int(context.get_values_from_const_input(6)),
                          "softmax": bool(context.get_values_from_const_input(8))}
            return factory.create(OP_TYPE, inputs, attributes).outputs()

        def global_attention(matrix: bool) -> Any:
            def convert(context: Any) -> Any:
                inputs = [context.get_input(index) for index in range(6)]
                attributes = {"heads": int(context.get_values_from_const_input(6)),
                              "scale": float(context.get_values_from_const_input(7)),
                              "matrix": matrix, "bf16": bool(context.get_values_from_const_input(8))}
                return factory.create(ATTENTION_OP_TYPE, inputs, attributes).outputs()
            return convert

        def fusion_softmax(context: Any) -> Any:
            inputs = [context.get_input(index) for index in range(3)]
            attributes = {"heads": int(context.get_values_from_const_input(3)),
                          **{name: bool(context.get_values_from_const_input(index))
                             for index, name in enumerate(("stable", "clamp_min", "clamp_max"), start=4)}}
            # The frontend reads a tuple's items as Gathers along its first output's first axis: a stack
            # of both outputs gives them their ranks until connect_outputs wires each reader to its output.
            from openvino import opset13

            outputs = factory.create(FUSION_OP_TYPE, inputs, attributes).outputs()
            return opset13.concat([opset13.unsqueeze(output, 0) for output in outputs], 0).outputs()

        return [ConversionExtension(TORCH_OP, deformable_attention),
                ConversionExtension(FUSION_TORCH_OP, fusion_softmax),
                *(ConversionExtension(name, global_attention(matrix)) for name, matrix in ATTENTION_TORCH_OPS.items())]

    def narrow_io(self, model: ov.Model) -> ov.Model:
        """``model`` (changed in place) with the library's DeformableAttention and FusionSoftmax nodes reading
        their image-sized inputs in bf16 and writing bf16 (``NARROWED_INPUTS``), through Convert nodes, for
        a graph compiled at bf16.

        The CPU plugin computes those inputs in bf16 there (the converts on them change nothing), but a
        library node keeps the types the model gives it, so the plugin would convert each input to f32
        and each output back: a pass over an image-sized tensor each (~50 ms of Grounding DINO's text half
        at 800 px for the deformable nodes). The nodes' arithmetic stays f32 and their outputs are rounded
        as the plugin's own conversion rounds. Nodes already in bf16 are left as they are.
        """
        import openvino as ov
        from openvino import opset13

        for node in model.get_ordered_ops():
            indices = NARROWED_INPUTS.get(node.get_type_name())
            if indices is None or node.get_input_element_type(0) != ov.Type.f32:
                continue
            for index in indices:
                node.input(index).replace_source_output(
                    opset13.convert(node.input_value(index), ov.Type.bf16).output(0))
            consumers = [list(output.get_target_inputs()) for output in node.outputs()]
            node.validate_and_infer_types()
            for output, targets in zip(node.outputs(), consumers, strict=True):
                widened = opset13.convert(output, ov.Type.f32)
                for target in targets:
                    target.replace_source_output(widened.output(0))
        model.validate_nodes_and_infer_types()
        return model

    def connect_outputs(self, model: ov.Model) -> ov.Model:
        """``model`` with each of the library's multi-output nodes' results taken from its own outputs.

        OpenVINO's torch.export frontend gives a custom operation one output: the operation's tuple is
        its first, and ``tuple[i]`` converts to a Gather of element i along that output's first axis
        (the batch; FusionSoftmax's converter stacks its outputs there first, ``conversion_extensions``).
        Each such Gather is replaced by the node's output i. Raises OpsLibraryError where a Gather of such
        an output is not this pattern (nothing else reads it).
        """
        import openvino as ov

        for node in model.get_ordered_ops():
            if node.get_type_name() not in (ATTENTION_OP_TYPE, FUSION_OP_TYPE):
                continue
            tuple_output = node.output(0)
            if node.get_type_name() == FUSION_OP_TYPE:  # its outputs, unsqueezed and concatenated
                readers = [target.get_node() for target in tuple_output.get_target_inputs()]
                stack = [target.get_node() for reader in readers for target in reader.output(0).get_target_inputs()]
                if [r.get_type_name() for r in readers] != ["Unsqueeze"] or \
                        [n.get_type_name() for n in stack] != ["Concat"]:
                    raise OpsLibraryError(f"{node.get_friendly_name()}'s outputs are not stacked as its converter "
                                          "stacks them")
                tuple_output = stack[0].output(0)
            for target in list(tuple_output.get_target_inputs()):
                gather = target.get_node()
                if gather.get_type_name() != "Gather":
                    continue
                index, axis = (gather.input_value(i).get_node() for i in (1, 2))
                if index.get_type_name() != "Constant" or axis.get_type_name() != "Constant" or \
                        int(axis.get_data().ravel()[0]) != 0 or index.get_data().size != 1:
                    raise OpsLibraryError(f"{gather.get_friendly_name()} reads {node.get_friendly_name()} in a "
                                          "way other than taking one of its outputs")
                item = int(index.get_data().ravel()[0])
                gather.output(0).replace(node.output(item))
        model.validate_nodes_and_infer_types()
        return ov.Model(model.get_results(), model.get_parameters(), model.get_friendly_name())


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise OpsLibraryError("no C++ compiler (set CXX, or install g++)")
    return compiler


def _openvino_paths() -> tuple[Path, list[Path]]:
    """OpenVINO's headers and the two libraries the operation links against (its core and TBB)."""
    import openvino

    root = Path(openvino.__file__).parent
    include, libs = root / "include", root / "libs"
    core = sorted(libs.glob("libopenvino.so.*"))
    tbb = sorted(libs.glob("libtbb.so.*"))
    if not (include / "openvino" / "op" / "op.hpp").is_file() or not core or not tbb:
        raise OpsLibraryError(f"OpenVINO's development headers or libraries are missing under {root}")
    return include, [core[0], tbb[0]]


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError) as exc:
        raise OpsLibraryError(f"the C++ compiler {compiler!r} does not run ({exc})") from exc


@dataclass(frozen=True)
class _Toolchain:
    """What a build needs and what its binary depends on."""

    compiler: str
    include: Path
    libraries: tuple[Path, ...]
    digest: str  # of the source, OpenVINO's version, the compiler and its flags, the CPU


def _toolchain() -> _Toolchain:
    import openvino

    if platform.system() != "Linux":
        raise OpsLibraryError(f"the operations library is built on Linux only, not {platform.system()}")
    compiler = _compiler()
    include, libraries = _openvino_paths()
    from .models import cpu_flags

    # -march=native emits what the CPU's flags allow: another CPU sharing the folder gets its own build.
    parts = sorted(path for path in CSRC.glob("*.[ch]pp") if path.name != "ops.cpp")
    sources = [SOURCE.read_text(), *(path.read_text() for path in parts)]
    identity = "\n".join([*sources, openvino.get_version(), _compiler_version(compiler), " ".join(FLAGS),
                          platform.machine(), " ".join(sorted(cpu_flags()))])
    return _Toolchain(compiler, include, tuple(libraries), hashlib.sha256(identity.encode()).hexdigest()[:16])


def build(folder: Path, toolchain: _Toolchain | None = None) -> OpsLibrary:
    """The library for this machine in ``folder``: compiled unless an earlier build is there.

    Its name is a digest of everything the binary depends on (the source, OpenVINO's version, the
    compiler and its flags, the CPU), so a changed source or another machine sharing the folder builds
    its own. Written to a temporary name and renamed into place, so concurrent starts never load a
    half-written file. Raises OpsLibraryError naming the cause (no compiler, missing headers, compile
    errors, a folder that can't be written).
    """
    started = time.perf_counter()
    toolchain = toolchain or _toolchain()
    path = folder / f"gsam_ops-{toolchain.digest}.so"
    if path.is_file():
        return OpsLibrary(path, False, time.perf_counter() - started)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".building-") as tmp:
            part = Path(tmp) / path.name
            command = [toolchain.compiler, *FLAGS, f"-I{toolchain.include}", f"-I{CSRC}", str(SOURCE), "-o", str(part),
                       *map(str, toolchain.libraries), f"-Wl,-rpath,{toolchain.libraries[0].parent}"]
            done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_SECONDS)
            if done.returncode != 0:
                tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
                raise OpsLibraryError(f"{Path(toolchain.compiler).name} failed on {SOURCE.name} "
                                      f"(exit {done.returncode}): {tail}")
            os.replace(part, path)
    except OSError as exc:
        raise OpsLibraryError(f"could not build in {folder} ({exc})") from exc
    except subprocess.TimeoutExpired as exc:
        raise OpsLibraryError(f"compiling {SOURCE.name} took over {BUILD_SECONDS} s") from exc
    seconds = time.perf_counter() - started
    logger.info("built OpenVINO operations library %s in %.1f s", path, seconds)
    return OpsLibrary(path, True, seconds)


def _open(library: OpsLibrary) -> None:
    try:
        ctypes.CDLL(str(library.path), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise OpsLibraryError(f"OpenVINO operations library {library.path} does not load ({exc})") from exc


def load(folder: Path) -> OpsLibrary:
    """``build(folder)``, loaded into this process for good.

    Once per process: a library of the same digest already loaded (from another folder) is reused
    rather than a second copy loaded, while its file exists (a Core reads IR through the file). Loaded
    with ``RTLD_GLOBAL`` and never unloaded: OpenVINO's nodes of these types point into the library's
    code, and a library unloaded before the last of them is destroyed (at interpreter exit, say)
    crashes the process. Raises OpsLibraryError as ``build``, or when the file does not load.
    """
    with _lock:
        toolchain = _toolchain()
        earlier = _loaded.get(toolchain.digest)
        if earlier is None or not earlier.path.is_file():
            library = build(folder, toolchain)
            try:
                _open(library)
            except OpsLibraryError as exc:
                if library.built:
                    raise
                # An earlier build left a file that does not load (truncated, say): build it again, once.
                logger.warning("%s; building it again", exc)
                library.path.unlink(missing_ok=True)
                library = build(folder, toolchain)
                _open(library)
            _loaded[toolchain.digest] = library
        return _loaded[toolchain.digest]


def load_for(cache_dir: Path, instead: str) -> OpsLibrary | None:
    """``load`` from ``cache_dir``/ops (the converted graphs' folder), or None where the library can't be
    built or loaded: one warning saying what runs ``instead`` (slower, same results) and why."""
    try:
        return load(cache_dir / "ops")
    except OpsLibraryError as exc:
        logger.warning("%s (slower, same results), because the operations library is not available: %s", instead, exc)
        return None
