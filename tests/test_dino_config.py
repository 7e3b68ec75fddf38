"""Reading Grounding DINO's SLConfig file: the same values as groundingdino's ``SLConfig.fromfile``,
without its ``sys.path`` insert/pop (whose pop took Ray's vendored packages off the path when the
server's Ray runner imported ray while the engine loaded)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

groundingdino = pytest.importorskip("groundingdino")
from groundingdino.util.slconfig import SLConfig  # noqa: E402 - after the importorskip

from backend.models import ModelLoadError, read_dino_config  # noqa: E402

SHIPPED = Path(groundingdino.__file__).parent / "config"


class RecordingPath(list[str]):
    """``sys.path`` that records every change made to it."""

    changes: list[str]

    def __init__(self, entries: list[str]) -> None:
        super().__init__(entries)
        self.changes = []

    def insert(self, index: Any, entry: Any) -> None:
        self.changes.append(f"insert({index}, {entry!r})")
        super().insert(index, entry)

    def pop(self, index: Any = -1) -> str:
        self.changes.append(f"pop({index})")
        return super().pop(index)

    def remove(self, entry: Any) -> None:
        self.changes.append(f"remove({entry!r})")
        super().remove(entry)

    def append(self, entry: Any) -> None:
        self.changes.append(f"append({entry!r})")
        super().append(entry)


def _plain(config: SLConfig) -> dict[str, Any]:
    return {key: value for key, value in config._cfg_dict.to_dict().items()
            if not isinstance(value, type(sys))}  # modules a config imports (none in the shipped ones)


@pytest.mark.parametrize("name", sorted(p.name for p in SHIPPED.glob("GroundingDINO_*.py")))
def test_shipped_configs_read_as_fromfile_reads_them_and_leave_sys_path_alone(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = SHIPPED / name
    expected = _plain(SLConfig.fromfile(str(path)))
    recording = RecordingPath(list(sys.path))
    monkeypatch.setattr(sys, "path", recording)
    config = read_dino_config(path)
    assert recording.changes == []
    assert _plain(config) == expected and expected
    assert config.filename == str(path)


def test_base_files_merge_as_fromfile_merges_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "base.py").write_text("hidden_dim = 256\nswin = dict(depth=2, heads=4)\nnheads = 8\n")
    (tmp_path / "other.py").write_text("dec_layers = 6\n")
    child = tmp_path / "child.py"
    child.write_text("_base_ = ['base.py', 'other.py']\nhidden_dim = 128\nswin = dict(heads=2)\n")
    expected = _plain(SLConfig.fromfile(str(child)))
    recording = RecordingPath(list(sys.path))
    monkeypatch.setattr(sys, "path", recording)
    got = _plain(read_dino_config(child))
    assert recording.changes == []
    assert got == expected
    assert got == {"hidden_dim": 128, "swin": {"depth": 2, "heads": 2}, "nheads": 8, "dec_layers": 6}


def test_base_files_that_set_one_key_twice_are_refused_as_fromfile_refuses_them(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("hidden_dim = 256\n")
    (tmp_path / "b.py").write_text("hidden_dim = 128\n")
    child = tmp_path / "child.py"
    child.write_text("_base_ = ['a.py', 'b.py']\n")
    with pytest.raises(KeyError):
        SLConfig.fromfile(str(child))
    with pytest.raises(ModelLoadError, match="hidden_dim") as caught:
        read_dino_config(child)
    assert str(child) in str(caught.value)


@pytest.mark.parametrize("text, reason", [("hidden_dim = (\n", "SyntaxError"),
                                          ("hidden_dim = undefined_name\n", "NameError")])
def test_an_unreadable_config_is_a_model_load_error_naming_the_file(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "bad_config.py"
    path.write_text(text)
    with pytest.raises(ModelLoadError, match=reason) as caught:
        read_dino_config(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("swin", ["official", "custom"])
def test_builds_in_two_threads_leave_sys_stdout_as_it_was(engine_config: Any, swin: str) -> None:
    """The build silences groundingdino's prints by swapping sys.stdout; two threads' builds at once
    must not restore each other's devnull (a closed file as the process's stdout afterwards). With
    groundingdino's own Swin-T (as the official variants build) and with a custom one (the tiny model's).
    Unserialised, a round goes wrong when the build that swapped first also ends first: three rounds."""
    import dataclasses
    import threading

    from backend.models import build_grounding_dino_architecture

    arch = dict(engine_config.dino_arch or {})
    if swin == "official":
        arch.pop("swin")
    config = dataclasses.replace(engine_config, dino_arch=arch)
    before = sys.stdout
    errors: list[BaseException] = []

    def build(start: threading.Barrier) -> None:
        start.wait()
        try:
            build_grounding_dino_architecture(config)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    for _ in range(3):
        start = threading.Barrier(2)
        threads = [threading.Thread(target=build, args=(start,)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert sys.stdout is before
