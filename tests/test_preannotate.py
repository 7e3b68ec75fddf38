"""`python -m backend.preannotate` against a real Label Studio 1.23.2 (tests/ls_server.py), with the
tiny random-weight models: predictions are stored, a rerun adds nothing, an interrupted run resumes,
one bad task is skipped and named, bad arguments give one clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.ls_server import (
    REPO_ROOT,
    LabelStudioServer,
    create_project,
    import_files,
    list_predictions,
    list_tasks,
    personal_access_token,
)

LABELS = ("tabby cat", "coffee cup")
CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
          + "".join(f'<Label value="{x}"/>' for x in LABELS) + "</BrushLabels></View>")
ENGINE_ENV = {"BOX_THRESHOLD": "0.2", "TEXT_THRESHOLD": "0.2", "MAX_DETECTIONS": "2"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    import skimage.data

    d = tmp_path_factory.mktemp("preannotate-photos")
    out = []
    for name in ("chelsea", "coffee", "astronaut"):
        path = d / f"{name}.png"
        Image.fromarray(getattr(skimage.data, name)()).save(path)
        out.append(path)
    return out


@pytest.fixture(scope="module")
def engine_env(tiny_cache: Path) -> dict[str, str]:
    return {"ENGINE_CONFIG": str(tiny_cache / "engine.json"), **ENGINE_ENV}


@pytest.fixture(scope="module")
def quick_engine(engine: Any, engine_env: dict[str, str]) -> Any:
    """The CLI's engine at ENGINE_ENV, sharing the session engine's weights."""
    from backend.config import EngineConfig
    from backend.engine import Engine

    return Engine(EngineConfig.from_env(engine_env), detector=engine.detector, segmenter=engine.segmenter)


def run_cli(ls: LabelStudioServer, engine_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_")) and k not in ("PROMPT", "PYTHONPATH")}
    env.update(engine_env, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token, HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", NO_PROXY="127.0.0.1,localhost")
    return subprocess.run([sys.executable, "-m", "backend.preannotate", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def predictions_by_task(ls: LabelStudioServer, project: int) -> dict[int, list[dict[str, Any]]]:
    return {t["id"]: t["predictions"] for t in list_tasks(ls, project)}


def test_cli_stores_predictions_and_rerun_adds_nothing(label_studio: LabelStudioServer, photos: list[Path],
                                                       engine_env: dict[str, str], quick_engine: Any,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from label_studio_sdk.converter.brush import decode_rle

    from backend.config import EngineConfig
    from backend.engine import model_version
    from backend.preannotate import main

    ls = label_studio
    pid = create_project(ls, CONFIG, title="preannotate-cli")
    task_ids = import_files(ls, pid, photos)
    bad = ls.api("POST", f"/api/projects/{pid}/import?return_task_ids=true",
                 json=[{"image": f"/data/upload/{pid}/gone.png"}]).json()["task_ids"][0]

    first = run_cli(ls, engine_env, "--project", str(pid), "--batch-size", "2")
    assert first.returncode == 1, first.stderr  # one task failed
    assert "done 3 (empty 0), skipped 0, failed 1 of 4 tasks" in first.stdout, (first.stdout, first.stderr)
    assert f"task {bad} failed: image download failed" in first.stderr
    assert "4/4" in first.stderr  # tqdm's progress bar reached the end
    assert ls.token not in first.stdout + first.stderr

    version = model_version(EngineConfig.from_env(engine_env))  # what the server reports too
    stored = predictions_by_task(ls, pid)
    assert stored[bad] == []  # no empty prediction for a failure: a rerun retries it
    for tid, photo in zip(task_ids, photos, strict=True):
        (pred,) = stored[tid]
        assert pred["model_version"] == version
        w, h = Image.open(photo).size
        assert pred["result"], f"{photo.name}: nothing found"
        for r in pred["result"]:
            assert r["type"] == "brushlabels" and r["value"]["brushlabels"][0] in LABELS
            assert (r["original_width"], r["original_height"]) == (w, h)
            mask = decode_rle(r["value"]["rle"]).reshape(h, w, 4)[:, :, 3]
            assert 0 < np.count_nonzero(mask) < w * h

    # Rerun in this process (same settings, so the same model version): only the failed task is retried.
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", ls.token)
    assert main(["--project", str(pid), "--url", ls.url, "--no-progress"], engine=quick_engine) == 1
    again = capsys.readouterr()
    assert "done 0 (empty 0), skipped 3, failed 1 of 4 tasks" in again.out, (again.out, again.err)
    assert len(list_predictions(ls, pid)) == 3


def test_interrupted_run_resumes(label_studio: LabelStudioServer, photos: list[Path], quick_engine: Any) -> None:
    from backend.ls_api import Credentials, LabelStudioClient
    from backend.preannotate import ProjectApi, build_model, preannotate

    ls = label_studio
    credentials = Credentials(ls.url, ls.token)
    model = build_model(None, credentials, quick_engine)
    pid = create_project(ls, CONFIG, title="preannotate-resume")
    task_ids = import_files(ls, pid, photos[:2])

    class CtrlCAfterFirst(ProjectApi):
        """Ctrl-C arrives while the second prediction is being stored."""

        def create_prediction(self, task_id: int, entry: dict[str, Any]) -> None:
            if len(list_predictions(ls, pid)) >= 1:
                raise KeyboardInterrupt
            super().create_prediction(task_id, entry)

    client = LabelStudioClient(credentials)
    summary = preannotate(CtrlCAfterFirst(client, pid), model, batch_size=1, progress=False)
    assert summary.interrupted and (summary.done, summary.skipped, summary.failed) == (1, 0, 0)
    assert [len(p) for p in predictions_by_task(ls, pid).values()] == [1, 0]

    summary = preannotate(ProjectApi(client, pid), model, batch_size=1, progress=False)
    assert not summary.interrupted and (summary.done, summary.skipped, summary.failed) == (1, 1, 0)
    stored = predictions_by_task(ls, pid)
    assert [len(stored[t]) for t in task_ids] == [1, 1]
    assert {p[0]["model_version"] for p in stored.values()} == {model.model_version}


def test_personal_access_token(label_studio: LabelStudioServer, photos: list[Path], quick_engine: Any,
                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A PAT (JWT refresh token) works for listing, image downloads and storing predictions."""
    from backend.preannotate import main

    ls = label_studio
    pid = create_project(ls, CONFIG, title="preannotate-pat")
    (task_id,) = import_files(ls, pid, photos[:1])
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", personal_access_token(ls))
    assert main(["--project", str(pid), "--url", ls.url, "--no-progress"], engine=quick_engine) == 0
    out = capsys.readouterr()
    assert "done 1 (empty 0), skipped 0, failed 0 of 1 tasks" in out.out, (out.out, out.err)
    assert "eyJ" not in out.out + out.err  # neither the PAT nor an access token is printed
    (pred,) = predictions_by_task(ls, pid)[task_id]
    assert pred["model_version"] == quick_engine.model_version and pred["result"]


@pytest.mark.parametrize("case, expected", [
    ("no-brush", "BrushLabels"),
    ("wrong-key", "rejected LABEL_STUDIO_API_KEY (HTTP 401)"),
    ("no-project", "no such object"),
    ("unknown-prompt", "unknown labels"),
])
def test_bad_input_is_one_clear_message(label_studio: LabelStudioServer, quick_engine: Any, case: str, expected: str,
                                        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from backend.preannotate import main

    ls = label_studio
    config = CONFIG
    if case == "no-brush":
        config = ('<View><Image name="image" value="$image"/><Choices name="c" toName="image">'
                  '<Choice value="a"/></Choices></View>')
    pid = create_project(ls, config, title=f"preannotate-{case}")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "not-a-valid-token-0123" if case == "wrong-key" else ls.token)
    args = ["--project", str(pid + 1000 if case == "no-project" else pid), "--url", ls.url, "--no-progress"]
    if case == "unknown-prompt":
        args += ["--prompt", "zebra"]
    assert main(args, engine=quick_engine) == 2
    err = capsys.readouterr().err
    assert err.startswith("preannotate: ") and expected in err, err
    assert ls.token not in err
    assert list_predictions(ls, pid) == []


def test_missing_api_key_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from backend.preannotate import main

    for name in ("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--project", "1", "--url", "http://127.0.0.1:9"])
    assert exit_info.value.code == 2
    assert "LABEL_STUDIO_API_KEY" in capsys.readouterr().err
