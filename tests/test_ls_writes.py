"""backend/jobs/writer.py against a real Label Studio 1.23.2 (tests/ls_server.py, started once).

These tests are about the writer itself, so the predictions are deterministic brush masks made here
(the real RLE encoder, ``backend.ls_results.mask_to_rle``), not model output: what is checked is what
Label Studio stores. The runner's tests (tests/test_job_runner.py) use the tiny engine.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from backend.jobs.writer import tasks_with_prediction, write_predictions
from backend.ls_api import Credentials, LabelStudioAuthError, LabelStudioClient
from backend.ls_results import mask_to_rle
from tests.ls_server import LabelStudioServer, create_project, list_predictions, personal_access_token

LABELS = ("tabby cat", "coffee cup")
CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
          + "".join(f'<Label value="{x}"/>' for x in LABELS) + "</BrushLabels></View>")
VERSION = "grounded-sam-test-v1"
SIZE = (24, 32)  # height, width of the masks


def brush_entry(task_id: int, label: str = "tabby cat", from_name: str = "mask") -> dict[str, Any]:
    """A /predict entry with one brush region whose mask depends on the task id."""
    mask = np.zeros(SIZE, dtype=bool)
    mask[2: 4 + task_id % 10, 3: 9 + task_id % 7] = True
    return {"result": [{
        "id": f"r{task_id}", "from_name": from_name, "to_name": "image", "type": "brushlabels",
        "original_width": SIZE[1], "original_height": SIZE[0], "image_rotation": 0, "score": 0.5,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}}],
        "score": 0.5, "model_version": "whatever the entry says"}


def make_tasks(ls: LabelStudioServer, project: int, n: int) -> list[int]:
    """``n`` tasks imported as JSON (the writer never reads their images)."""
    body = [{"image": f"/data/upload/{project}/img{i}.png"} for i in range(n)]
    r = ls.api("POST", f"/api/projects/{project}/import?return_task_ids=true", json=body)
    return [int(i) for i in r.json()["task_ids"]]


def by_task(ls: LabelStudioServer, project: int) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for p in list_predictions(ls, project):
        out.setdefault(int(p["task"]), []).append(p)
    return out


@pytest.fixture
def client(label_studio: LabelStudioServer) -> LabelStudioClient:
    return LabelStudioClient(Credentials(label_studio.url, label_studio.token))


def test_each_task_gets_one_prediction_and_a_second_write_adds_none(label_studio: LabelStudioServer,
                                                                     client: LabelStudioClient) -> None:
    ls = label_studio
    pid = create_project(ls, CONFIG, title="writer-once")
    ids = make_tasks(ls, pid, 5)
    entries = {t: brush_entry(t) for t in ids}

    first = write_predictions(client, pid, entries, VERSION, chunk_size=2)  # 3 bulk requests
    assert sorted(first.written) == ids and first.skipped == [] and first.rejected == {}
    stored = by_task(ls, pid)
    assert sorted(stored) == ids
    for task_id in ids:
        (prediction,) = stored[task_id]
        assert prediction["model_version"] == VERSION  # the job's version, whatever the entry said
        assert prediction["result"] == entries[task_id]["result"]
        assert prediction["score"] == 0.5

    second = write_predictions(client, pid, entries, VERSION, chunk_size=2)
    assert second.written == [] and sorted(second.skipped) == ids
    assert len(list_predictions(ls, pid)) == 5


def test_other_versions_do_not_count_as_written(label_studio: LabelStudioServer, client: LabelStudioClient) -> None:
    """Label Studio's version filter matches substrings; the writer compares versions exactly."""
    ls = label_studio
    pid = create_project(ls, CONFIG, title="writer-versions")
    a, b, c = make_tasks(ls, pid, 3)
    write_predictions(client, pid, {a: brush_entry(a)}, VERSION + "-longer")
    write_predictions(client, pid, {b: brush_entry(b)}, "other")
    write_predictions(client, pid, {c: brush_entry(c)}, VERSION)
    assert tasks_with_prediction(client, pid, [a, b, c], VERSION) == {c}
    outcome = write_predictions(client, pid, {t: brush_entry(t) for t in (a, b, c)}, VERSION)
    assert sorted(outcome.written) == [a, b] and outcome.skipped == [c]
    versions = sorted((p["task"], p["model_version"]) for p in list_predictions(ls, pid))
    assert versions == sorted([(a, VERSION + "-longer"), (a, VERSION), (b, "other"), (b, VERSION), (c, VERSION)])


def test_a_task_not_in_the_project_is_rejected_alone(label_studio: LabelStudioServer,
                                                     client: LabelStudioClient) -> None:
    ls = label_studio
    pid = create_project(ls, CONFIG, title="writer-bad-task")
    other = create_project(ls, CONFIG, title="writer-other")
    ids = make_tasks(ls, pid, 4)
    (foreign,) = make_tasks(ls, other, 1)
    entries = {t: brush_entry(t) for t in [*ids[:2], foreign, *ids[2:]]}
    outcome = write_predictions(client, pid, entries, VERSION)
    assert sorted(outcome.written) == ids
    assert list(outcome.rejected) == [foreign] and "Label Studio rejected the prediction" in outcome.rejected[foreign]
    assert sorted(by_task(ls, pid)) == ids and list_predictions(ls, other) == []


def test_a_result_label_studio_drops_is_named(label_studio: LabelStudioServer, client: LabelStudioClient) -> None:
    """Label Studio 1.23.2 drops a prediction that fails its config validation yet answers 201."""
    ls = label_studio
    pid = create_project(ls, CONFIG, title="writer-invalid")
    good, bad = make_tasks(ls, pid, 2)
    outcome = write_predictions(client, pid, {good: brush_entry(good), bad: brush_entry(bad, from_name="nope")},
                                VERSION)
    assert outcome.written == [good] and list(outcome.rejected) == [bad]
    assert "validation" in outcome.rejected[bad]
    assert sorted(by_task(ls, pid)) == [good]


def test_personal_access_token_writes(label_studio: LabelStudioServer) -> None:
    ls = label_studio
    pid = create_project(ls, CONFIG, title="writer-pat")
    ids = make_tasks(ls, pid, 2)
    client = LabelStudioClient(Credentials(ls.url, personal_access_token(ls)))
    assert client.is_pat
    outcome = write_predictions(client, pid, {t: brush_entry(t) for t in ids}, VERSION)
    assert sorted(outcome.written) == ids and sorted(by_task(ls, pid)) == ids


def test_wrong_key_is_an_auth_error_and_writes_nothing(label_studio: LabelStudioServer) -> None:
    ls = label_studio
    pid = create_project(ls, CONFIG, title="writer-wrong-key")
    ids = make_tasks(ls, pid, 2)
    client = LabelStudioClient(Credentials(ls.url, "not-a-valid-token-0123456789"))
    with pytest.raises(LabelStudioAuthError, match=r"rejected LABEL_STUDIO_API_KEY \(HTTP 401\)"):
        write_predictions(client, pid, {t: brush_entry(t) for t in ids}, VERSION)
    assert list_predictions(ls, pid) == []
