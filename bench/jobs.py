"""The job machinery's overhead: a whole prediction job vs the sum of its tasks predicted one by one.

    python -m bench --jobs 200          # 200 tasks on the tiny models, against a real Label Studio
    python -m bench --jobs 6 --json out.json   # what tests/test_bench.py runs

A real Label Studio 1.23.2 (tests/ls_server.py) gets two projects with the same tasks (``DISTINCT``
photos uploaded, the rest of the tasks pointing at them in turn, more of them than the engine's
caches hold, so no task is a cache hit). On one project each task is predicted alone, as a job's
predictor does it (``GroundedSamModel.predict_job_task``: image download from Label Studio with the
key, decode, Grounding DINO, SAM, results), and the times are summed. On the other, the same tasks
are a job of a ``JobStore`` (SQLite in a temp folder) run by ``JobRunner.run_job``, as
``backend.preannotate`` runs it: claims, the "already written?" checks, bulk writes to Label Studio,
records. Overhead = job wall time / sum of single-task times - 1 (target <= 5%).

Both run in this process after a warm-up, the job between the two halves of the singles; Label Studio
runs beside them on the same cores, so its share of a write (~35-65 ms per prediction, see
backend/jobs/writer.py) is part of the job's overhead unless the writer thread hides it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
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
TARGET_OVERHEAD = 0.05


@dataclass
class JobBench:
    tasks: int
    single_sum_s: float  # sum of the single-task predict times
    single_median_ms: float
    job_wall_s: float  # JobRunner.run_job, start to end (every prediction written)
    overhead: float  # job_wall_s / single_sum_s - 1
    written: int  # predictions in Label Studio after the job
    job_state: str
    job_rate: float | None  # tasks/s, the store's own figure


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
    from bench.run import photos
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

        # Singles: the predictor a job runs, one task at a time (the job itself is never run).
        holder = store.create_job(str(single_project), version, single_tasks, plan=plan,
                                  label_config=BRUSH_CONFIG, credentials=credentials)
        assert holder.job_id is not None
        single_job = store.get_job(holder.job_id)
        assert single_job is not None
        store.cancel(holder.job_id)
        for task in single_tasks[:WARMUP_TASKS]:
            model.predict_job_task(single_job, task)
        # The job runs between two halves of the singles, so load that drifts during the run weighs on
        # both sides alike.
        times: list[float] = []

        def singles(part: list[dict[str, Any]]) -> None:
            log(f"{len(part)} single-task predictions")
            for task in part:
                started = time.perf_counter()
                model.predict_job_task(single_job, task)
                times.append(time.perf_counter() - started)

        singles(single_tasks[:tasks // 2])
        log(f"a {tasks}-task job")
        created = store.create_job(str(job_project), version, job_tasks, plan=plan,
                                   label_config=BRUSH_CONFIG, credentials=credentials)
        assert created.job_id is not None
        runner = model.job_runner()
        started = time.perf_counter()
        final = runner.run_job(created.job_id)
        wall = time.perf_counter() - started
        assert final is not None
        singles(single_tasks[tasks // 2:])
        written = len(list_predictions(ls, job_project))
        single_sum = sum(times)
        result = JobBench(tasks=tasks, single_sum_s=single_sum, single_median_ms=1000 * sorted(times)[len(times) // 2],
                          job_wall_s=wall, overhead=wall / single_sum - 1, written=written, job_state=final.state,
                          job_rate=final.rate)
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
        f"(median {result.single_median_ms:.0f} ms/task)",
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
