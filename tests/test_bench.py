"""The benchmark script keeps working: ``python -m bench --smoke`` on the tiny models, end to end
(reference chain, engine, /predict batch, memory probes), and its figures are sane."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_bench_smoke_runs_and_reports(tiny_cache, tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "TINY_MODEL_CACHE": str(tiny_cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--repeats", "1", "--batch-tasks", "2", "--runtime", "openvino",
         "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for figure in ("ours cold task (fp32) / reference", "mask IoU vs fp32 reference chain (fp32, mean)", "re-prompt",
                   "explain already-predicted task", "peak RSS, task with capture", "/predict:", "dino_backbone",
                   "sam_encoder", "Speed options", "SAM encoder on openvino", "lscpu:",
                   "mask IoU vs torch fp32 on the same boxes", "SAM encoder (openvino) with capture / without",
                   "OpenVINO capture graph: conversion", "OpenVINO plain graph: conversion", "cache on disk",
                   "OpenVINO dino_text graph: conversion", "OpenVINO dino_image graph: conversion",
                   "mask IoU, SAM bf16 vs fp32, same boxes (mean)", "ours re-prompt",
                   "new threshold (same image + text) / cold"):
        assert figure in proc.stdout, f"{figure!r} missing from the report:\n{proc.stdout}"
    data = json.loads(out.read_text())
    # OpenVINO f32 against torch fp32 on the same boxes: the same masks.
    assert data["rows"]["runtime_iou"][0] >= 0.99
    assert data["notes"]["conversion"]["capture"]["bytes"] > 0
    rows = data["rows"]
    assert rows["reference_boxes"][0] >= rows["ours_boxes"][0] > 0
    assert rows["ours_reprompt_boxes"][0] == int(rows["ours_reprompt_boxes"][0]) >= 0  # a count, logged per repeat
    # Same weights, same photo: the engine's masks are the reference chain's.
    assert rows["mask_iou"][0] >= 0.99
    for key in ("reference_cold", "ours_cold", "ours_reprompt", "ours_threshold", "ours_explain_cached"):
        assert rows[key][0] > 0 and math.isfinite(rows[key][0])
    # A looser threshold keeps every box of the stricter one (its text half comes from the cache).
    assert rows["ours_threshold_boxes"][0] >= rows["ours_reprompt_boxes"][0]
    # An already-explained task comes from the cache: far below a cold run even on tiny models.
    assert rows["ours_explain_cached"][0] < rows["ours_cold"][0] / 5
    memory = data["notes"]["memory"]
    assert memory["with"]["peak_mib"] > memory["with"]["baseline_mib"] > 0
    batch = data["notes"]["batch"]
    assert batch["tasks"] == 2 and batch["sequential_s"] > 0 and batch["batch_s"] > 0
    probs_diff, boxes_diff = data["notes"]["detector_max_abs_diff"]
    assert probs_diff < 1e-4 and boxes_diff < 1e-4


def test_bench_smoke_in_bf16_reports_its_iou_against_fp32(tiny_cache, tmp_path):
    """--precision bf16 (the GPU bench's mode) runs the engine under autocast, FLOP counting included."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "TINY_MODEL_CACHE": str(tiny_cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--repeats", "1", "--skip", "batch", "--skip", "memory",
         "--device", "cpu", "--precision", "bf16", "--runtime", "torch", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ours cold task (bf16) / reference" in proc.stdout
    assert "mask IoU vs fp32 reference chain (bf16, mean)" in proc.stdout
    data = json.loads(out.read_text())
    assert data["info"]["precision"] == "bf16" and data["info"]["device"] == "cpu"
    assert 0.0 <= data["rows"]["mask_iou"][0] <= 1.0
    assert data["notes"]["flops"]["sam_encoder"] > 0


def test_box_decoder_bench_times_both_forms_and_reports_their_accuracy(tiny_cache, tmp_path):
    out = tmp_path / "box_decoder.json"
    proc = subprocess.run([sys.executable, "-m", "bench.box_decoder", "--cache", str(tiny_cache), "--rounds", "1",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| flags " in proc.stdout and "vs segment_anything" in proc.stdout  # the CPU beside the times
    rows = {(row["form"], row["boxes"]): row for row in json.loads(out.read_text())["rows"]}
    assert len(rows) == 12  # 4 forms x 3 box counts
    for (form, _), row in rows.items():
        assert row["median_ms"] > 0 and len(row["rounds_s"]) == 1
        if form == "BoxDecoder fp32":  # the same arithmetic as segment_anything's fp32 decoder
            assert row["max_diff"] < 1e-4 and row["pixels_agree"] > 0.999 and row["iou_diff"] < 1e-5
        elif form.endswith("bf16"):
            assert row["pixels_agree"] > 0.98


def test_bench_refuses_a_sam_size_for_the_tiny_models():
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--sam", "vit_h"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--sam applies to the real-size models" in proc.stderr


@pytest.mark.e2e
def test_bench_jobs_mode_times_a_job_written_to_label_studio(tiny_cache, tmp_path):
    """``python -m bench --jobs N`` (the job machinery's overhead) on a handful of tasks: the job writes
    every task's prediction to the real Label Studio it starts, and both sides of the ratio are timed."""
    from tests.ls_server import label_studio_installed

    if not label_studio_installed():
        pytest.skip("Label Studio is not installed; run scripts/install_label_studio.sh")
    out = tmp_path / "jobs.json"
    env = {**os.environ, "TINY_MODEL_CACHE": str(tiny_cache)}
    proc = subprocess.run([sys.executable, "-m", "bench", "--jobs", "4", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for figure in ("Job machinery overhead (4 tasks", "sum of single-task predictions", "whole job (JobRunner.run_job)",
                   "4 predictions written to Label Studio, job done", "job overhead", "cores, torch"):
        assert figure in proc.stdout, f"{figure!r} missing from the report:\n{proc.stdout}"
    data = json.loads(out.read_text())
    jobs = data["jobs"]
    assert (jobs["tasks"], jobs["written"], jobs["job_state"]) == (4, 4, "done")
    assert jobs["single_sum_s"] > 0 and jobs["job_wall_s"] > 0
    assert math.isclose(jobs["overhead"], jobs["job_wall_s"] / jobs["single_sum_s"] - 1)
    assert data["info"]["cpu"] and data["info"]["isa"]


def test_bench_jobs_mode_refuses_no_tasks():
    proc = subprocess.run([sys.executable, "-m", "bench", "--jobs", "0"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--jobs needs at least 1 task" in proc.stderr
