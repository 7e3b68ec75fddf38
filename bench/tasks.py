"""The measurements of ``python -m bench``: cold tasks against the reference chain, re-prompts and
explanations (``run_tasks``), the /predict batch, peak memory in a fresh process, and the models it runs.

bench/run.py parses the command line and calls these in order; bench/report.py prints the figures.
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import bench.runtime as rt
from bench.cache import DINO_CONFIG_FILE, write_cache
from bench.measure import StageTimer, matched_iou, photos, sampling_peak_rss
from bench.reference import ReferenceChain

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "grounded-sam-bench-cache"
# Prompts from the stand-in vocabulary (bench/cache.py, tests/tiny_models.py); each cold task gets its own.
PROMPTS = ["cat . dog", "person . rocket", "car . tree", "coffee . cup", "flag . moon", "horse . boat",
           "bird . sky", "chair . table", "man . woman", "camera . face"]
BOXES_PER_TASK = 8  # thresholds are calibrated so the reference keeps this many boxes
BRUSH_CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
                '<Label value="cat"/><Label value="dog"/></BrushLabels></View>')


@dataclass
class Mode:
    name: str
    repeats: int
    dino_size: int | None  # None: the cache's own (800/1333 for real models)
    batch_tasks: int
    real: bool = True
    device: str = "cpu"
    sam_variant: str = "vit_b"
    precision: str = "fp32"  # the engine's; the reference chain always runs fp32, as it ships
    runtime: str = "auto"  # the engine's RUNTIME for SAM's image encoder


# -- setup ---------------------------------------------------------------------------------------------
def model_cache(mode: Mode, cache: Path | None) -> tuple[Path, dict[str, Any]]:
    """engine.json of the cache to use, and the reference chain's files/arch."""
    if mode.real:
        engine_json = write_cache(cache or DEFAULT_CACHE, mode.sam_variant)
        data = json.loads(engine_json.read_text())
        root = engine_json.parent
        return engine_json, dict(dino_config=root / DINO_CONFIG_FILE, dino_checkpoint=root / data["dino_checkpoint"],
                                 sam_checkpoint=root / data["sam_checkpoint"], sam_variant=mode.sam_variant)
    from tests.tiny_models import write_cache as write_tiny

    root = Path(os.environ.get("TINY_MODEL_CACHE") or cache or Path(tempfile.gettempdir()) / "grounded-sam-tiny")
    engine_json = root / "engine.json" if (root / "engine.json").is_file() else write_tiny(root, mobile_sam=False)
    data = json.loads(engine_json.read_text())
    config_py = _tiny_dino_config(engine_json.parent, data)
    return engine_json, dict(dino_config=config_py, dino_checkpoint=engine_json.parent / data["dino_checkpoint"],
                             sam_checkpoint=engine_json.parent / data["sam_checkpoint"], sam_arch=data["sam_arch"])


def _tiny_dino_config(root: Path, data: dict) -> Path:
    """An SLConfig file for the tiny Grounding DINO, so groundingdino's own load_model can build it.

    groundingdino knows only five named Swins; in smoke mode (this process only, which never builds a
    real-size Swin) its swin_T_224_1k builder is pointed at the tiny Swin's hyper-parameters."""
    import groundingdino
    from groundingdino.models.GroundingDINO.backbone import backbone as backbone_module
    from groundingdino.models.GroundingDINO.backbone.swin_transformer import SwinTransformer

    swin = dict(data["dino_arch"]["swin"])
    backbone_module.build_swin_transformer = (
        lambda modelname, pretrain_img_size, **kw: SwinTransformer(pretrain_img_size=pretrain_img_size,
                                                                   **{**swin, **kw}))
    text = (Path(groundingdino.__file__).parent / "config" / "GroundingDINO_SwinT_OGC.py").read_text()
    lines = [ln for ln in text.splitlines() if not ln.startswith("text_encoder_type")]
    lines += [f"text_encoder_type = {str(root / data['text_encoder'])!r}"]
    lines += [f"{k} = {v!r}" for k, v in data["dino_arch"].items() if k != "swin"]
    path = Path(tempfile.gettempdir()) / f"GroundingDINO_bench_tiny_{os.getpid()}.py"
    path.write_text("\n".join(lines) + "\n")
    atexit.register(path.unlink, missing_ok=True)  # read by every model build of this run, then litter
    return path


def calibrate(engine, images: list[np.ndarray], prompts: list[str], keep: int) -> list[float]:
    """Per image: the box threshold at which ``keep`` queries score above it for a requested phrase.

    Random weights score every query alike, so a fixed threshold would keep none or hundreds. The
    reference (whose threshold applies to any token, [CLS] and '.' included) keeps at least these;
    both counts are reported, and the encoder-only ratio does not depend on them."""
    from backend.detector import Caption, parse_prompt

    thresholds = []
    for image, prompt in zip(images, prompts, strict=True):
        caption = Caption.build(parse_prompt(prompt), engine.detector.tokenizer)
        raw = engine.detector.raw_predictions(engine.detector.image_features(image), caption)
        tokens = [i for idx in caption.phrase_tokens for i in idx]
        scores = raw.token_probs[:, tokens].max(dim=1).values.sort(descending=True).values
        k = min(keep, len(scores) - 1)
        thresholds.append(float((scores[k - 1] + scores[k]) / 2))
    return thresholds


def detector_difference(engine, ref, path: Path, prompt: str) -> tuple[float, float]:
    """Max abs difference of token probabilities and boxes: our detector vs groundingdino's forward."""
    from groundingdino.util.inference import preprocess_caption

    from backend.detector import Caption, parse_prompt

    image, tensor = ref.load_image(path)
    caption = Caption.build(parse_prompt(prompt), engine.detector.tokenizer)
    with torch.no_grad():
        theirs = ref.dino(tensor[None].to(ref.device), captions=[preprocess_caption(caption.text)])
    theirs = {k: theirs[k].float().cpu() for k in ("pred_logits", "pred_boxes")}
    ours = engine.detector.raw_predictions(engine.detector.image_features(image), caption)
    n = len(caption.tokens)
    probs = (ours.token_probs[:, :n] - theirs["pred_logits"][0, :, :n].sigmoid()).abs().max()
    boxes = (ours.boxes_cxcywh - theirs["pred_boxes"][0]).abs().max()
    return float(probs), float(boxes)


# -- the measurements ---------------------------------------------------------------------------------
@dataclass
class Results:
    rows: dict[str, list[float]] = field(default_factory=dict)
    stages: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.rows.setdefault(key, []).append(value)

    def add_stages(self, who: str, stages: dict[str, float]) -> None:
        for k, v in stages.items():
            self.stages.setdefault(who, {}).setdefault(k, []).append(v)


def run_tasks(mode: Mode, engine_json: Path, ref_files: dict, workdir: Path, res: Results, log) -> Any:
    from backend.config import EngineConfig
    from backend.engine import Engine
    from backend.explainer import render_explanation

    # Re-prompts keep the same box budget.
    overrides: dict[str, Any] = {"max_detections": BOXES_PER_TASK, "device": mode.device, "precision": mode.precision,
                                 "runtime": mode.runtime}
    if mode.dino_size:
        overrides.update(dino_image_size=mode.dino_size, dino_max_size=int(mode.dino_size * 1333 / 800))
    config = EngineConfig.from_file(engine_json, **overrides)
    t0 = time.perf_counter()
    engine = Engine(config)
    log(f"engine loaded in {time.perf_counter() - t0:.1f} s ({engine.describe()})")
    res.notes["conversion"] = rt.conversion_figures(engine)
    log(f"OpenVINO graphs: {json.dumps(res.notes['conversion'])}")
    # Off torch, the masks are also compared with torch fp32's on the very same boxes.
    torch_sam = rt.torch_fp32_segmenter(engine) if engine.segmenter.encoder.name != "torch" else None
    ref = ReferenceChain(image_size=config.dino_image_size, max_size=config.dino_max_size, device=mode.device,
                         **ref_files)
    timer = StageTimer(engine, mode.device)

    n = mode.repeats
    images = photos(2 * n + 1)  # one warm-up, then per repeat: a cold image and (for bf16 etc.) a spare
    paths = []
    for i, img in enumerate(images):
        paths.append(workdir / f"photo{i}.png")
        Image.fromarray(img).save(paths[-1])
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(images))]
    thresholds = calibrate(engine, images[: n + 1], prompts[: n + 1], BOXES_PER_TASK)
    text_threshold = 0.0  # the box threshold decides; predict's phrase extraction needs one

    # Warm-up (allocator, oneDNN primitives, lazy imports) on an image that is never timed; FLOPs are
    # counted here once per stage.
    timer.count_flops = True
    engine.segment(paths[0], prompts[0], thresholds[0], text_threshold)
    timer.count_flops = False
    res.notes["flops"] = dict(timer.flops)
    timer.take(0.0)
    ref.run(paths[0], prompts[0], thresholds[0], text_threshold)
    log(f"warm-up done; GFLOP per stage: { {k: round(v / 1e9, 1) for k, v in timer.flops.items()} }")
    res.notes["detector_max_abs_diff"] = detector_difference(engine, ref, paths[0], prompts[0])
    timer.take(0.0)
    log(f"detector vs groundingdino forward, max abs diff (probs, boxes): {res.notes['detector_max_abs_diff']}")

    for r in range(1, n + 1):
        path, prompt, bt = paths[r], prompts[r], thresholds[r]
        t0 = time.perf_counter()
        out = ref.run(path, prompt, bt, text_threshold)
        t_ref = time.perf_counter() - t0
        res.add("reference_cold", t_ref)
        res.add_stages("reference", out.stages)
        res.add("reference_boxes", len(out.boxes_xyxy))

        t0 = time.perf_counter()
        segments = engine.segment(path, prompt, bt, text_threshold)
        t_cold = time.perf_counter() - t0
        res.add("ours_cold", t_cold)
        res.add_stages("ours", timer.take(t_cold))
        res.add("ours_boxes", len(segments))
        res.add("reference_encoders",
                out.stages["dino_backbone"] + out.stages["dino_text_decoder"] + out.stages["sam_encoder"])
        st = res.stages["ours"]
        res.add("ours_encoders", st["dino_backbone"][-1] + st["dino_text_decoder"][-1] + st["sam_encoder"][-1])
        iou, _ = matched_iou(segments, out.boxes_xyxy, out.masks)
        res.add("mask_iou", iou)
        if torch_sam is not None:
            boxes = np.array([d.prompt_box for d in engine.detect(path, prompt, bt, text_threshold)]).reshape(-1, 4)
            res.add("runtime_iou", rt.same_box_iou(engine, torch_sam, engine.load_image(path), boxes))
            timer.take(0.0)

        reprompt = PROMPTS[(r + 5) % len(PROMPTS)]
        t0 = time.perf_counter()
        reprompt_boxes = len(engine.segment(path, reprompt, bt, text_threshold))
        res.add("ours_reprompt", time.perf_counter() - t0)
        # The cold prompt's threshold: a re-prompt finds its own number of boxes, each decoded by SAM.
        res.add("ours_reprompt_boxes", reprompt_boxes)
        res.add_stages("ours_reprompt", timer.take(res.rows["ours_reprompt"][-1]))
        # The same image and text at a looser box threshold (a slider moved): Grounding DINO's scores
        # come from the cache; the selection and SAM's mask decoder run.
        t0 = time.perf_counter()
        res.add("ours_threshold_boxes", len(engine.segment(path, reprompt, bt * 0.9, text_threshold)))
        res.add("ours_threshold", time.perf_counter() - t0)
        timer.take(0.0)

        t0 = time.perf_counter()
        explanation = engine.explain(path, prompt, bt, text_threshold)
        res.add("ours_explain_cached", time.perf_counter() - t0)
        rgb = engine.load_image(path)
        t0 = time.perf_counter()
        render_explanation(explanation, rgb)
        res.add("ours_explain_render", time.perf_counter() - t0 + res.rows["ours_explain_cached"][-1])
        timer.take(0.0)
        log(f"repeat {r}/{n}: reference {t_ref:.1f} s ({len(out.boxes_xyxy)} boxes), ours cold {t_cold:.1f} s "
            f"({len(segments)} boxes, IoU {iou:.4f}), re-prompt {res.rows['ours_reprompt'][-1]:.2f} s "
            f"({reprompt_boxes} boxes), new threshold {res.rows['ours_threshold'][-1]:.2f} s "
            f"({res.rows['ours_threshold_boxes'][-1]} boxes), "
            f"cached explain {res.rows['ours_explain_cached'][-1] * 1e3:.0f} ms")
    return engine, thresholds


def run_batch(engine, mode: Mode, res: Results, log) -> None:
    """16 tasks in one /predict request vs 16 single-task requests (Flask test client, new images)."""
    from backend._wsgi import ServerSettings, create_app
    from backend.engine import Engine

    # Fixed detections per image, so both phases decode the same number of boxes.
    batch_engine = Engine(engine.config.replace(max_detections=4, box_threshold=0.0, text_threshold=0.0),
                          detector=engine.detector, segmenter=engine.segmenter)
    client = create_app(engine=batch_engine, settings=ServerSettings(load_on_start=False)).test_client()
    n = mode.batch_tasks
    images = photos(2 * n + 40)[40:]  # never seen by the engine's caches

    def task(i: int, img: np.ndarray) -> dict:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        return {"id": i, "data": {"image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}

    def post(tasks: list[dict]) -> None:
        response = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH_CONFIG, "project": "1"})
        body = response.get_json()
        if response.status_code != 200 or len(body["results"]) != len(tasks):
            raise RuntimeError(f"/predict failed: {response.status_code} {str(body)[:300]}")
        if any(not r["result"] for r in body["results"]):
            raise RuntimeError("/predict returned an empty prediction in the benchmark batch")

    sequential = [task(i, img) for i, img in enumerate(images[:n])]
    batch = [task(i, img) for i, img in enumerate(images[n:])]
    t0 = time.perf_counter()
    for t in sequential:
        post([t])
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    post(batch)
    t_batch = time.perf_counter() - t0
    res.notes["batch"] = {"tasks": n, "sequential_s": t_seq, "batch_s": t_batch,
                          "throughput_ratio": t_seq / t_batch}
    log(f"/predict: {n} single-task requests {t_seq:.1f} s, one {n}-task request {t_batch:.1f} s")


def memory_probe(engine_json: Path, explanations: bool, dino_size: int | None, device: str,
                 precision: str, runtime: str = "auto") -> dict[str, float]:
    """In this (fresh) process: load, run one cold task, report peak RSS (and GPU memory) of the task, MiB."""
    from backend.config import EngineConfig
    from backend.engine import Engine
    from backend.heap import return_freed_memory

    overrides: dict[str, Any] = {"explanations": explanations, "max_detections": BOXES_PER_TASK,
                                 "device": device, "precision": precision, "runtime": runtime}
    if dino_size:
        overrides.update(dino_image_size=dino_size, dino_max_size=int(dino_size * 1333 / 800))
    engine = Engine(EngineConfig.from_file(engine_json, **overrides))
    image = photos(1)[0]
    return_freed_memory()  # hand loading's freed buffers back: a clean baseline
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        gpu_before = torch.cuda.memory_allocated()
    with sampling_peak_rss() as rss:
        engine.segment(image, "cat . dog", 0.0, 0.0)
    mib = 1 << 20
    figures = {"baseline_mib": rss.before / mib, "peak_mib": rss.peak / mib, "task_mib": (rss.peak - rss.before) / mib}
    if device == "cuda":
        gpu_peak = torch.cuda.max_memory_allocated()
        figures.update(gpu_baseline_mib=gpu_before / mib, gpu_peak_mib=gpu_peak / mib,
                       gpu_task_mib=(gpu_peak - gpu_before) / mib)
    return figures


def run_memory(engine_json: Path, mode: Mode, res: Results, log) -> None:
    figures = {}
    for explanations in (False, True):
        cmd = [sys.executable, "-m", "bench.run", "--memory-probe", str(engine_json),
               "--explanations", "on" if explanations else "off", "--device", mode.device,
               "--precision", mode.precision, "--runtime", mode.runtime]
        if mode.dino_size:
            cmd += ["--dino-size", str(mode.dino_size)]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"memory probe failed: {out.stderr[-2000:]}")
        figures["with" if explanations else "without"] = json.loads(out.stdout.strip().splitlines()[-1])
    res.notes["memory"] = figures
    log(f"memory: {json.dumps(figures)}")


def same_box_precision_iou(engine, res: Results, log) -> None:
    """SAM under bf16 against fp32 on the same boxes of 3 photos (the figure behind PRECISION=auto)."""
    from backend.models import build_sam
    from bench.precision import same_box_iou

    # Loaded again: an engine on OpenVINO frees its own SAM's torch encoder weights.
    iou = same_box_iou(build_sam(engine.config), engine.segmenter.device, photos(3))
    res.notes["same_box_iou"] = dataclasses.asdict(iou)
    log(f"SAM bf16 vs fp32 on the same boxes: mask IoU mean {iou.mean:.4f}, min {iou.min:.4f}")
