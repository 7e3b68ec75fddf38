"""openvino is pinned without openvino-telemetry: nothing is installed that could send usage statistics.

openvino requires openvino-telemetry, whose tracker its converter (convert_model) runs with the consent
dialog off: statistics go to Google Analytics unless the user opted out. requirements.lock leaves the
package out and every install of the lock uses --no-deps (scripts/setup_venv.sh, docker/), so openvino
falls back to its bundled no-op stub. These tests check the set-up and that openvino works without it.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _locked() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_lock_pins_openvino_without_its_telemetry():
    pins = _locked()
    assert pins.get("openvino") == "2026.4.1"
    assert "openvino-telemetry" not in pins
    assert "openvino==2026.4.1" in (REPO / "requirements.in").read_text()
    # The lock is installed without dependency resolution, which would bring the package back.
    setup = (REPO / "scripts" / "setup_venv.sh").read_text()
    assert re.search(r"pip install [^\n]*--no-deps -r \"\$LOCK\"", setup)
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        text = (REPO / "docker" / dockerfile).read_text()
        assert "pip install --no-deps -r /tmp/rest.txt" in text and "pip install -r /tmp/rest.txt" not in text


def test_openvino_telemetry_is_not_installed():
    assert importlib.util.find_spec("openvino_telemetry") is None, (
        "openvino_telemetry is importable: this venv was not made by scripts/setup_venv.sh from the lock "
        "(run it again: it removes the package)"
    )


# Runs in a fresh interpreter where openvino_telemetry cannot be imported even if some other venv has it.
_CONVERT_WITHOUT_TELEMETRY = r"""
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "openvino_telemetry":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Refuse())
import numpy as np, openvino as ov, torch
torch.manual_seed(0)
nn = torch.nn
module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 5))
x = torch.randn(2, 3, 16, 16)
model = ov.convert_model(torch.export.export(module.eval(), (x,)))
compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
np.testing.assert_allclose(compiled(x.numpy())[0], module(x).detach().numpy(), rtol=1e-4, atol=1e-5)
assert "openvino_telemetry" not in sys.modules
print("ok", sorted(m for m in sys.modules if "telemetry" in m))
"""


@pytest.mark.integration  # a fresh interpreter converts a model: tens of seconds, not the quick loop
def test_openvino_converts_and_compiles_without_telemetry():
    pytest.importorskip("openvino")
    out = subprocess.run([sys.executable, "-c", _CONVERT_WITHOUT_TELEMETRY], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok") and "openvino.tools.ovc.telemetry_stub" in out.stdout
