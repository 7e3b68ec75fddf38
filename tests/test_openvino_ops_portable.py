"""The operations library built for a CPU without AVX-512 (``-march=x86-64-v3``: AVX2 and FMA): its plain
C++ paths, which this suite's AVX-512 machines never run in the native build, compute what groundingdino
does (the deformable attention with padding and its weights' softmax, the fusion softmaxes), in f32 and
with bf16 inputs and outputs. Run in a fresh interpreter, so that the native build this process has
loaded (``RTLD_GLOBAL``) cannot stand in for the portable one's symbols."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from backend import openvino_ops

pytest.importorskip("openvino")
ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import json, sys, types
from pathlib import Path
import numpy as np, openvino as ov, torch
from backend.fusion_attention import softmaxes
from tests import test_fusion_softmax as fusion, test_openvino_ops as deformable

library = types.SimpleNamespace(path=Path(sys.argv[1]))
core = ov.Core()
core.add_extension(sys.argv[1])
errors = {}
for ref_dim, points, queries in [(2, 4, 301), (4, 4, 40), (4, 3, 301)]:
    compiled = core.compile_model(deformable.op_model(library, ref_dim, points, softmax=True), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    inputs = deformable.op_inputs(2, queries, ref_dim, seed=points, points=points)
    inputs[4] = inputs[4] * 20 - 10
    inputs[5][0, 50:90] = True
    ours = torch.from_numpy(np.asarray(compiled([t.numpy() for t in inputs])[0])).double()
    want = deformable.expected(inputs, points, softmax=True)
    errors[f"deformable {ref_dim} {points} {queries}"] = float((ours - want).abs().max() / want.abs().max())
for narrow in (False, True):
    model = fusion.op_model(library)
    if narrow:
        from backend.openvino_ops import OpsLibrary
        model = OpsLibrary(Path(sys.argv[1]), False, 0.0).narrow_io(model)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    inputs = fusion.op_inputs(301, 27, seed=3)
    if narrow:
        inputs[0] = inputs[0].bfloat16().float()
    got = fusion.run(compiled, inputs)
    want = softmaxes(inputs[0].double(), inputs[1], inputs[2], fusion.HEADS, True, True, True)
    for name, a, b in zip(("to_text", "to_image"), got, want):
        errors[f"fusion {name} {'bf16' if narrow else 'f32'}"] = float((a.double() - b).abs().max())
print(json.dumps(errors))
"""


@pytest.fixture(scope="module")
def portable_library(tmp_path_factory) -> Path:
    flags = tuple("-march=x86-64-v3" if flag == "-march=native" else flag for flag in openvino_ops.FLAGS)
    original = openvino_ops.FLAGS
    openvino_ops.FLAGS = flags
    try:
        return openvino_ops.build(tmp_path_factory.mktemp("portable_ops"), openvino_ops._toolchain()).path
    finally:
        openvino_ops.FLAGS = original


def test_plain_paths_compute_what_groundingdino_does(portable_library):
    done = subprocess.run([sys.executable, "-c", CHECK, str(portable_library)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(errors) == 7
    for name, error in errors.items():
        # f32 arithmetic against float64; bf16 outputs are rounded to 8 bits of mantissa
        assert error < (5e-3 if "bf16" in name else 2e-5), (name, error)
