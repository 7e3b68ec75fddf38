"""Jobs when Label Studio is away, refuses a large chunk, or the job is cancelled mid-way: a real Label
Studio 1.23.2 behind ``tests/ls_proxy.py`` (drops connections as a restarting server does; answers 413
over a body limit as nginx does), the tiny random-weight engine, a job store on a temp SQLite file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend.jobs.runner import JobRunner
from backend.jobs.store import CANCELLED, DONE, FAILED, PENDING, RUNNING, JobStore
from backend.jobs.writer import entry_bytes, write_predictions
from backend.ls_api import Credentials, LabelStudioClient
from backend.ls_results import mask_to_rle
from tests.ls_proxy import LabelStudioProxy
from tests.ls_server import LabelStudioServer, create_project, import_files, list_predictions
from tests.photos import photo_files
from tests.test_job_runner import CONFIG, EnginePredictor, client_factory, new_job, tiny_model
from tests.test_ls_writes import VERSION, make_tasks


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return photo_files(tmp_path_factory.mktemp("outage-photos"))


@pytest.fixture(scope="module")
def model(engine: Any, tiny_cache: Path, label_studio: LabelStudioServer) -> Any:
    return tiny_model(Credentials(label_studio.url, label_studio.token), tiny_cache, engine)


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite3'}", retry_delay_s=0.0, max_attempts=2)


@pytest.fixture
def proxy(label_studio: LabelStudioServer) -> Any:
    with LabelStudioProxy(label_studio.url) as running:
        yield running


def one_each(ls: LabelStudioServer, pid: int) -> dict[int, int]:
    counts: dict[int, int] = {}
    for p in list_predictions(ls, pid):
        counts[int(p["task"])] = counts.get(int(p["task"]), 0) + 1
    return counts


def test_predictions_made_before_a_cancel_are_not_written(label_studio: LabelStudioServer, photos: list[Path],
                                                          model: Any, store: JobStore) -> None:
    ls = label_studio
    pid = create_project(ls, CONFIG, title="cancel-after-predict")
    ids = import_files(ls, pid, photos[:2])
    job = new_job(store, ls, pid, model.model_version)
    predictor = EnginePredictor(model)
    runner = JobRunner(store, predictor, client_factory, batch_size=2, chunk_size=10, flush_s=3600)
    assert runner.run_once()  # both predicted; they wait for a fuller chunk
    assert sorted(predictor.calls) == ids and list_predictions(ls, pid) == []
    assert store.cancel(job)
    runner.run_until_idle(timeout=30)  # hands what it holds to the writer
    progress = store.progress(job)
    assert progress is not None and (progress.state, progress.pending, progress.done) == (CANCELLED, 2, 0)
    assert list_predictions(ls, pid) == []


def test_label_studio_restarting_mid_job_spends_no_attempts_and_loses_nothing(
        label_studio: LabelStudioServer, proxy: LabelStudioProxy, photos: list[Path], model: Any,
        store: JobStore) -> None:
    """Down for longer than all the tasks' retries take (store: 2 attempts, no retry delay)."""
    ls = label_studio
    pid = create_project(ls, CONFIG, title="ls-restart")
    ids = import_files(ls, pid, photos[:2])
    job = new_job(store, ls, pid, model.model_version, key=ls.token)
    with store._write() as conn:  # the job writes through the proxy
        conn.exec_driver_sql("UPDATE jobs SET ls_url = ? WHERE id = ?", (proxy.url, job))
    predictor = EnginePredictor(model)
    runner = JobRunner(store, predictor, client_factory, batch_size=2, outage_backoff_s=0.2)
    proxy.down = True
    runner.run_until_idle(timeout=6)
    progress = store.progress(job)
    assert progress is not None and progress.state in (RUNNING, "queued"), progress
    assert (progress.pending, progress.failed, progress.done) == (2, 0, 0), progress
    assert progress.errors and all(e.state == PENDING and "waiting for Label Studio" in e.error
                                   and "can't reach Label Studio" in e.error for e in progress.errors), progress
    assert predictor.calls == []  # nothing predicted while its results couldn't be written

    proxy.down = False
    runner.run_until_idle(timeout=120)
    progress = store.progress(job)
    assert progress is not None and (progress.state, progress.done, progress.failed) == (DONE, 2, 0), progress
    assert one_each(ls, pid) == {t: 1 for t in ids}


def test_label_studio_gone_for_good_stops_the_job_with_the_reason(
        label_studio: LabelStudioServer, proxy: LabelStudioProxy, photos: list[Path], model: Any,
        store: JobStore) -> None:
    ls = label_studio
    pid = create_project(ls, CONFIG, title="ls-gone")
    import_files(ls, pid, photos[:1])
    job = new_job(store, ls, pid, model.model_version)
    with store._write() as conn:
        conn.exec_driver_sql("UPDATE jobs SET ls_url = ? WHERE id = ?", (proxy.url, job))
    proxy.down = True
    runner = JobRunner(store, EnginePredictor(model), client_factory, outage_backoff_s=0.2, outage_give_up_s=2)
    started = time.monotonic()
    runner.run_until_idle(timeout=60)
    assert time.monotonic() - started < 20  # it stops; it doesn't wait for the timeout
    progress = store.progress(job)
    assert progress is not None and progress.state == FAILED, progress
    assert "can't reach Label Studio" in (progress.error or "") and "unavailable for" in (progress.error or "")
    assert (progress.pending, progress.failed) == (1, 0)  # kept for a later Retrieve, not burnt


def noisy_entry(task_id: int, side: int) -> dict[str, Any]:
    """A brush region whose RLE is long (a noisy mask): the JSON of a large image's mask."""
    mask = np.random.default_rng(task_id).random((side, side)) > 0.5
    return {"result": [{
        "id": f"r{task_id}", "from_name": "mask", "to_name": "image", "type": "brushlabels",
        "original_width": side, "original_height": side, "image_rotation": 0, "score": 0.5,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": ["tabby cat"]}}], "score": 0.5}


def test_chunks_are_bounded_by_bytes_and_a_413_costs_only_the_too_large_prediction(
        label_studio: LabelStudioServer, proxy: LabelStudioProxy) -> None:
    """Behind a proxy with a body limit (nginx client_max_body_size): chunks that fit are written whole,
    a chunk over the limit is split, and a prediction too large alone is rejected naming the limit."""
    ls = label_studio
    pid = create_project(ls, CONFIG, title="writer-413")
    ids = make_tasks(ls, pid, 6)
    entries = {t: noisy_entry(t, 60) for t in ids[:5]}
    one = max(entry_bytes(e) for e in entries.values())
    entries[ids[5]] = noisy_entry(ids[5], 200)  # over the limit alone
    assert entry_bytes(entries[ids[5]]) > 4 * one
    proxy.max_body = one * 3 + 500  # three small predictions fit in a request, five don't
    client = LabelStudioClient(Credentials(proxy.url, ls.token))
    outcome = write_predictions(client, pid, entries, VERSION, chunk_size=20)
    assert sorted(outcome.written) == ids[:5] and outcome.skipped == []
    assert list(outcome.rejected) == [ids[5]] and "HTTP 413" in outcome.rejected[ids[5]]
    assert "client_max_body_size" in outcome.rejected[ids[5]]
    assert one_each(ls, pid) == {t: 1 for t in ids[:5]}

    # With a byte bound below the limit, no request is refused at all.
    pid2 = create_project(ls, CONFIG, title="writer-bytes")
    ids2 = make_tasks(ls, pid2, 5)
    proxy.bodies.clear()
    outcome = write_predictions(client, pid2, {t: noisy_entry(t, 60) for t in ids2}, VERSION, chunk_size=20,
                                chunk_bytes=one * 2)
    assert sorted(outcome.written) == ids2 and outcome.rejected == {}
    assert max(proxy.bodies) <= proxy.max_body and len(proxy.bodies) == 3
