"""The job machinery's overhead: a whole prediction job vs the sum of its tasks' single predictions.

    python -m bench --jobs 200          # 200 tasks on the tiny models, against a real Label Studio
    python -m bench --jobs 4 --json out.json   # what tests/test_bench.py runs

A real Label Studio 1.23.2 (tests/ls_server.py) gets the tasks (``DISTINCT`` photos uploaded, the
rest of the tasks pointing at them in turn, more of them than the engine's caches hold, so no task is
a cache hit). The tasks are a job of a ``JobStore`` (SQLite in a temp folder) run by
``JobRunner.run_job``, as ``backend.preannotate`` runs it: claims, the "already written?" checks,
bulk writes to Label Studio, records. Each task is predicted alone, one after the other, by the job's
predictor (``GroundedSamModel.predict_job_task``: image download from Label Studio with the key,
decode, Grounding DINO, SAM, results), and that call is timed where it runs, so the sum of
single-task times is taken side by side with the job's wall time, under the same load:
overhead = job wall time / that sum - 1 (target <= 5%).

As a cross-check, ``SINGLES`` tasks of a second project (photos of its own) are predicted alone
outside any job, half before the job and half after; their median is printed beside the in-job
median (a gap is load drift on a shared machine, or Label Studio's writes competing for the cores).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

BRUSH_CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
                '<Label value="cat"/><Label value="person"/><Label value="cup"/></BrushLabels></View>')
# Distinct photos per project: above the engine's embedding (8) and explanation (16) caches, so
# cycling through them never hits a cache.
DISTINCT = 25
PHOTO_SIZE = (320, 240)
WARMUP_TASKS = 3
SINGLES = 40  # at most this many tasks (a fifth of the job's) are predicted outside it (cross-check)
TARGET_OVERHEAD = 0.05


@dataclass
class JobBench:
    tasks: int
    single_sum_s: float  # sum of the single-task predict times, timed inside the job
    single_median_ms: float  # ... their median
    alone_median_ms: float  # median of SINGLES tasks predicted outside any job (cross-check)
    job_wall_s: float  # JobRunner.run_job, start to end (every prediction written)
    overhead: float  # job_wall_s / single_sum_s - 1
    written: int  # predictions in Label Studio after the job
    job_state: str
    job_rate: float | None  # tasks/s, the store's own figure


class _Timed:
    """The job's predictor, timing each call where it runs."""

    def __init__(self, predict: Callable[[Any, Any], dict[str, Any]]) -> None:
        self.predict = predict
        self.times: list[float] = []

    def __call__(self, job: Any, task: Any) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            return self.predict(job, task)
        finally:
            self.times.append(time.perf_counter() - started)


def _project(ls: Any, title: str, files: list[Path], tasks: int) -> tuple[int, list[dict[str, Any]]]:
    """A project with ``tasks`` tasks over ``files`` (uploaded once); its id, and its tasks as
    /predict gets them."""
    from tests.ls_server import create_project, import_files, list_tasks

    pid = create_project(ls, BRUSH_CONFIG, title=title)
    import_files(ls, pid, files[:tasks])
    if tasks > len(files):
        uploads = [t["data"]["image"] for t in list_tasks(ls, pid)]
        extra = [{"image": uploads[i % len(uploads)]} for i in range(tasks - len(uploads))]
        ls.api("POST", f"/api/projects/{pid}/import", json=extra)
    listed = sorted(list_tasks(ls, pid), key=lambda t: t["id"])
    assert len(listed) == tasks, f"project {pid} has {len(listed)} tasks, expected {tasks}"
    return pid, [{k: v for k, v in t.items() if k not in ("predictions", "annotations", "drafts")} for t in listed]


def run_jobs_bench(tasks: int, engine_json: Path, log: Any) -> tuple[JobBench, dict[str, Any]]:
    """Start Label Studio, time ``tasks`` single predictions and a ``tasks``-task job; stop it."""
    from backend.config import EngineConfig
    from backend.engine import Engine
    from backend.jobs.store import JobStore
    from backend.ls_api import Credentials
    from backend.preannotate import build_model
    from bench.measure import photos
    from tests.ls_server import LabelStudioServer, list_predictions

    env = {"ENGINE_CONFIG": str(engine_json), "BOX_THRESHOLD": "0.2", "TEXT_THRESHOLD": "0.2", "MAX_DETECTIONS": "2"}
    engine = Engine(EngineConfig.from_env(env))
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp, LabelStudioServer() as ls:
        log(f"Label Studio up in {ls.startup_seconds or 0:.0f} s")
        distinct = min(DISTINCT, tasks)
        files = []
        for i, rgb in enumerate(photos(2 * distinct, PHOTO_SIZE)):
            path = Path(tmp) / f"photo-{i:03d}.png"
            Image.fromarray(rgb).save(path)
            files.append(path)
        # Photos of their own per project: the job's tasks must not hit what the singles cached.
        single_project, single_tasks = _project(ls, "bench-single", files[:distinct], tasks)
        job_project, job_tasks = _project(ls, "bench-job", files[distinct:], tasks)
        store = JobStore(f"sqlite:///{Path(tmp) / 'jobs.sqlite3'}")
        credentials = Credentials(ls.url, ls.token)
        model = build_model("cat . person . cup", credentials, engine, jobs=store)
        version = model.model_version
        plan = {"phrases": ["cat", "person", "cup"], "box_threshold": 0.2, "text_threshold": 0.2}

        # Cross-check: the predictor a job runs, outside any job (that job is cancelled, never run).
        holder = store.create_job(str(single_project), version, single_tasks, plan=plan,
                                  label_config=BRUSH_CONFIG, credentials=credentials)
        assert holder.job_id is not None
        single_job = store.get_job(holder.job_id)
        assert single_job is not None
        store.cancel(holder.job_id)
        for task in single_tasks[:WARMUP_TASKS]:
            model.predict_job_task(single_job, task)
        alone: list[float] = []

        def singles(part: list[dict[str, Any]]) -> None:
            log(f"{len(part)} single-task predictions outside the job")
            for task in part:
                started = time.perf_counter()
                model.predict_job_task(single_job, task)
                alone.append(time.perf_counter() - started)

        count = max(2, min(SINGLES, tasks // 5))
        sample = single_tasks[WARMUP_TASKS:WARMUP_TASKS + count] or single_tasks[:count]
        singles(sample[:len(sample) // 2])
        log(f"a {tasks}-task job")
        created = store.create_job(str(job_project), version, job_tasks, plan=plan,
                                   label_config=BRUSH_CONFIG, credentials=credentials)
        assert created.job_id is not None
        timed = _Timed(model.predict_job_task)
        runner = model.job_runner(predict=timed)
        started = time.perf_counter()
        final = runner.run_job(created.job_id)
        wall = time.perf_counter() - started
        assert final is not None
        singles(sample[len(sample) // 2:])
        written = len(list_predictions(ls, job_project))
        single_sum = sum(timed.times)
        result = JobBench(tasks=tasks, single_sum_s=single_sum, single_median_ms=1000 * statistics.median(timed.times),
                          alone_median_ms=1000 * statistics.median(alone), job_wall_s=wall,
                          overhead=wall / single_sum - 1, written=written, job_state=final.state, job_rate=final.rate)
        notes = {"label_studio_startup_s": ls.startup_seconds, "batch_size": runner.batch_size,
                 "chunk_size": runner.chunk_size, "distinct_photos": len(files), "photo_size": PHOTO_SIZE}
    return result, notes


def report(result: JobBench, info: dict[str, Any]) -> str:
    ok = "meets" if result.overhead <= TARGET_OVERHEAD else "misses"
    return "\n".join([
        f"# Job machinery overhead ({result.tasks} tasks, tiny random models, {info['device']})",
        f"{info['date']} | {info['cpu']} | {info['cores']} cores, torch {info['torch']} ({info['isa']}), "
        f"{info['torch_threads']} threads | load avg {info['load_avg_start']:.1f} -> {info['load_avg_end']:.1f}",
        "",
        f"sum of single-task predictions   {result.single_sum_s:8.2f} s   "
        f"(timed inside the job; median {result.single_median_ms:.0f} ms/task, "
        f"{result.alone_median_ms:.0f} ms outside any job)",
        f"whole job (JobRunner.run_job)    {result.job_wall_s:8.2f} s   ({result.written} predictions written to "
        f"Label Studio, job {result.job_state})",
        f"job overhead                     {100 * result.overhead:+8.1f} %   (target <= {100 * TARGET_OVERHEAD:.0f}%: "
        f"{ok} it)",
    ])


def main(tasks: int, engine_json: Path, info: dict[str, Any], json_out: Path | None, log: Any) -> int:
    """``python -m bench --jobs N``: print the report (and write the raw figures to ``json_out``)."""
    if tasks < 1:
        raise ValueError(f"--jobs needs at least 1 task, got {tasks}")
    info.update(load_avg_start=os.getloadavg()[0])
    result, notes = run_jobs_bench(tasks, engine_json, log)
    info["load_avg_end"] = os.getloadavg()[0]
    print(report(result, info))
    if json_out:
        json_out.write_text(json.dumps({"info": info, "jobs": asdict(result), "notes": notes}, indent=2, default=str))
    return 0 if result.written == tasks and result.job_state == "done" else 1
