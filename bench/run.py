"""Side-by-side benchmark: the project's engine vs the reference chain, in one run, on this machine.

    python -m bench            # real-size vit_b + SwinT-OGC (random weights), ~15 min on 2 CPU cores
    python -m bench --quick    # fewer repeats, smaller Grounding DINO input, 4-task batch
    python -m bench --smoke    # tiny models (tests/tiny_models.py): checks the script still works
    python -m bench --device cuda --sam vit_h --precision bf16   # the GPU bench (per-stage ms)
    python -m bench --jobs 200  # a 200-task job vs its tasks one by one (tiny models, real Label Studio)
    python -m bench --runtime openvino --precision bf16   # SAM's encoder on OpenVINO (+ IoU vs torch fp32)

Everything is timed interleaved (reference, ours, reference, ours, ...) so background load hits both
alike; figures are medians. See bench/README.md for what each figure means and measured results.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import bench.runtime as rt  # noqa: E402
from bench.cache import DINO_CONFIG_FILE, SAM_VARIANTS, write_cache  # noqa: E402
from bench.reference import ReferenceChain, clock  # noqa: E402

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


MODES = {
    "default": Mode("default", repeats=3, dino_size=None, batch_tasks=16),
    "quick": Mode("quick", repeats=2, dino_size=512, batch_tasks=4),
    "smoke": Mode("smoke", repeats=2, dino_size=None, batch_tasks=3, real=False),
}


# -- helpers ------------------------------------------------------------------------------------------
def median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # a task with no boxes has no IoU (nan)
    return float(statistics.median(values)) if values else float("nan")


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of one box a (4,) against boxes b (N, 4), xyxy."""
    lt, rb = np.maximum(a[:2], b[:, :2]), np.minimum(a[2:], b[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area = lambda x: np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def matched_iou(segments, ref_boxes: np.ndarray, ref_masks: np.ndarray) -> tuple[float, int]:
    """Mean mask IoU of our segments against the reference mask of the best-overlapping reference box."""
    ious = []
    for s in segments:
        if len(ref_boxes) == 0:
            ious.append(0.0)
            continue
        # Our boxes are clipped to the image (SAM still gets them unclipped, as the reference does).
        height, width = s.mask.shape
        clipped = ref_boxes.astype(np.float64).clip(0, [width, height, width, height])
        j = int(np.argmax(box_iou(np.asarray(s.box, dtype=np.float64), clipped)))
        ious.append(mask_iou(s.mask, ref_masks[j]))
    return (float(np.mean(ious)) if ious else float("nan")), len(ious)


def photos(count: int, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """``count`` distinct RGB photos (scikit-image's samples, flipped/cropped into new images)."""
    import skimage.data

    bases = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    out = []
    for i in range(count):
        img = bases[i % len(bases)]
        k = i // len(bases)
        if k:  # a different crop + flip for each round: new content digest, same kind of photo
            h, w = img.shape[:2]
            img = img[(7 * k) % (h // 8):, (11 * k) % (w // 8):]
            img = img[:, ::-1] if k % 2 else img[::-1]
        img = np.ascontiguousarray(img)
        if size is not None:
            img = np.asarray(Image.fromarray(img).resize(size))
        out.append(img)
    return out


class StageTimer:
    """Times the engine's stages by wrapping its detector/segmenter methods on the instance."""

    STAGES = {("detector", "image_features"): "dino_backbone", ("detector", "raw_predictions"): "dino_text_decoder",
              ("segmenter", "embed"): "sam_encoder", ("segmenter", "segment"): "sam_decoder_post"}

    def __init__(self, engine, device: str) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.flops: dict[str, float] = {}
        self.count_flops = False
        for (owner, method), stage in self.STAGES.items():
            obj = getattr(engine, owner)
            setattr(obj, method, self._wrap(getattr(obj, method), stage))

    def _wrap(self, fn: Callable, stage: str) -> Callable:
        def timed(*args, **kwargs):
            ctx = flop_counter() if self.count_flops else contextlib.nullcontext()
            t0 = clock(self.device)
            with ctx as counter:
                result = fn(*args, **kwargs)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + clock(self.device) - t0
            if counter is not None:
                self.flops[stage] = self.flops.get(stage, 0.0) + counter.get_total_flops()
            return result

        return timed

    def take(self, total: float) -> dict[str, float]:
        stages, self.seconds = self.seconds, {}
        stages["other"] = max(0.0, total - sum(stages.values()))
        return stages


def flop_counter():
    """torch's FlopCounterMode plus SDPA's CPU kernel (which it does not count): 4 * B * H * Lq * Lk * D."""
    from torch.utils.flop_counter import FlopCounterMode

    def sdpa_flops(query_shape, key_shape, *args, **kwargs) -> int:
        b, h, lq, d = query_shape
        return 4 * b * h * lq * key_shape[-2] * d

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = lambda q, k, *a, out_shape=None, **kw: sdpa_flops(q, k)
    return FlopCounterMode(display=False, custom_mapping=mapping)


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5, device: str = "cpu") -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    with torch.inference_mode():
        torch.mm(a, a)  # first call: kernel selection / cuBLAS handle
        for _ in range(reps):
            t0 = clock(device)
            torch.mm(a, a)
            best = min(best, clock(device) - t0)
    return 2 * n ** 3 / best / 1e9


def machine(device: str) -> dict[str, Any]:
    model = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "isa": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "load_avg_start": os.getloadavg()[0],
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None}


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
    log(f"SAM image encoder: {json.dumps(res.notes['conversion'])}")
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
        engine.segment(path, reprompt, bt, text_threshold)
        res.add("ours_reprompt", time.perf_counter() - t0)
        res.add_stages("ours_reprompt", timer.take(res.rows["ours_reprompt"][-1]))

        t0 = time.perf_counter()
        explanation = engine.explain(path, prompt, bt, text_threshold)
        res.add("ours_explain_cached", time.perf_counter() - t0)
        rgb = engine.load_image(path)
        t0 = time.perf_counter()
        render_explanation(explanation, rgb)
        res.add("ours_explain_render", time.perf_counter() - t0 + res.rows["ours_explain_cached"][-1])
        timer.take(0.0)
        log(f"repeat {r}/{n}: reference {t_ref:.1f} s ({len(out.boxes_xyxy)} boxes), ours cold {t_cold:.1f} s "
            f"({len(segments)} boxes, IoU {iou:.4f}), re-prompt {res.rows['ours_reprompt'][-1]:.2f} s, "
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
    import ctypes

    from backend.config import EngineConfig
    from backend.engine import Engine

    overrides: dict[str, Any] = {"explanations": explanations, "max_detections": BOXES_PER_TASK,
                                 "device": device, "precision": precision, "runtime": runtime}
    if dino_size:
        overrides.update(dino_image_size=dino_size, dino_max_size=int(dino_size * 1333 / 800))
    engine = Engine(EngineConfig.from_file(engine_json, **overrides))
    image = photos(1)[0]
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand loading's freed buffers back: a clean baseline
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * page

    before, peak, done = rss(), [0], threading.Event()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        gpu_before = torch.cuda.memory_allocated()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    engine.segment(image, "cat . dog", 0.0, 0.0)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss())
    mib = 1 << 20
    figures = {"baseline_mib": before / mib, "peak_mib": peak[0] / mib, "task_mib": (peak[0] - before) / mib}
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


# -- report ------------------------------------------------------------------------------------------
def report(res: Results, info: dict[str, Any]) -> str:
    m = {k: median(v) for k, v in res.rows.items()}
    cold, ref = m["ours_cold"], m["reference_cold"]
    precision, on_gpu = info["precision"], info["device"] == "cuda"
    conversion = res.notes.get("conversion", {})
    runtime = conversion.get("runtime", "torch")
    cpu = info.get("lscpu", {})
    flags = " ".join(cpu.get("flags", [])) or "none of " + ", ".join(rt.CPU_FLAGS)
    lines = [f"# Grounded SAM benchmark ({info['mode']} mode, {info['models']}, {info['device']}, ours in {precision}, "
             f"SAM encoder on {runtime})",
             f"{info['date']} | {info['cpu']} | {info['cores']} cores, torch {info['torch']} ({info['isa']}), "
             f"{info['torch_threads']} threads | load avg {info['load_avg_start']:.1f} -> {info['load_avg_end']:.1f}"
             + (f" | GPU {info['gpu']}" if on_gpu else ""),
             f"lscpu: {cpu.get('model', '?')} | flags: {flags}",
             f"matmul ({info['matmul_n']}^2, {info['device']}): fp32 {info['matmul_fp32']:.0f} GFLOP/s, "
             f"bf16 {info['matmul_bf16']:.0f} GFLOP/s",
             f"repeats: {len(res.rows['ours_cold'])} (medians), boxes per task: reference "
             f"{median(res.rows['reference_boxes']):.0f}, ours {median(res.rows['ours_boxes']):.0f}", "",
             f"{'figure':44s} {'value':>12s} {'ratio':>10s} {'target':>8s}"]

    def row(name: str, value: str, ratio: float | None = None, target: str = "") -> None:
        r = f"{ratio:.3f}x" if ratio is not None else ""
        lines.append(f"{name:44s} {value:>12s} {r:>10s} {target:>8s}")

    row("reference cold task (DINO predict + SamPredictor)", f"{ref:.2f} s")
    openvino = runtime == "openvino"
    row(f"ours cold task ({precision}) / reference", f"{cold:.2f} s", cold / ref, "<= 0.25" if openvino else "<= 0.4")
    row("  DINO + SAM encoders only / reference", f"{m['ours_encoders']:.2f} s",
        m["ours_encoders"] / m["reference_encoders"], "")
    # The reference chain runs fp32; in a reduced precision this is that mode's difference from it.
    row(f"mask IoU vs fp32 reference chain ({precision}, mean)", f"{m['mask_iou']:.4f}", None,
        ">= 0.99" if precision == "fp32" else "report")
    same = res.notes.get("same_box_iou")
    if same:
        row("mask IoU, SAM bf16 vs fp32, same boxes (mean)", f"{same['mean']:.4f}", None, ">= 0.98")
        row("  worst box", f"{same['min']:.4f}", None, "")
    if "runtime_iou" in m:
        row("mask IoU vs torch fp32 on the same boxes", f"{m['runtime_iou']:.4f}", None, ">= 0.98")
    row("re-prompt (same image, new text) / cold", f"{m['ours_reprompt']:.2f} s", m["ours_reprompt"] / cold,
        "<= 0.15" if openvino else "<= 0.2")
    row("  re-prompt / reference cold", f"{m['ours_reprompt']:.2f} s", m["ours_reprompt"] / ref, "")
    row("explain already-predicted task / cold", f"{m['ours_explain_cached'] * 1e3:.1f} ms",
        m["ours_explain_cached"] / cold, "<= 0.05")
    row("  + rendering the heatmaps (UI/API payload)", f"{m['ours_explain_render'] * 1e3:.0f} ms",
        m["ours_explain_render"] / cold, "")
    mem = res.notes.get("memory")
    if mem:
        w, wo = mem["with"], mem["without"]
        row("peak RSS, task with capture / without", f"{w['peak_mib']:.0f} MiB", w["peak_mib"] / wo["peak_mib"],
            "" if on_gpu else "<= 1.2")
        row("  task's own growth: with / without", f"{w['task_mib']:.0f} MiB",
            w["task_mib"] / max(wo["task_mib"], 1e-9), "")
        if on_gpu:
            row("peak GPU memory, task with capture / without", f"{w['gpu_peak_mib']:.0f} MiB",
                w["gpu_peak_mib"] / wo["gpu_peak_mib"], "<= 1.2")
            row("  task's own GPU growth: with / without", f"{w['gpu_task_mib']:.0f} MiB",
                w["gpu_task_mib"] / max(wo["gpu_task_mib"], 1e-9), "")
    overhead = res.notes.get("capture_overhead")
    if overhead:
        row(f"SAM encoder ({runtime}) with capture / without", f"{overhead['with_s']:.2f} s", overhead["ratio"],
            "<= 1.1")
    for kind in ("capture", "plain"):
        figures = conversion.get(kind)
        if figures:
            how = "this run" if figures["converted_now"] else f"an earlier run; read in {figures['load_s']:.1f} s"
            convert_s = figures["convert_s"]
            row(f"OpenVINO {kind} graph: conversion ({how})", f"{convert_s:.1f} s" if convert_s else "?")
            row(f"  compile ({conversion['precision']})", f"{figures['compile_s']:.1f} s")
            row("  cache on disk", f"{figures['bytes'] / (1 << 20):.0f} MiB")
    batch = res.notes.get("batch")
    if batch:
        row(f"/predict: {batch['tasks']} tasks, 1 request vs {batch['tasks']} requests", f"{batch['batch_s']:.1f} s",
            batch["throughput_ratio"], ">= 1.5")
    unit, scale = ("ms", 1e3) if on_gpu else ("s", 1.0)
    lines += ["", f"Stage medians ({unit}) and achieved GFLOP/s "
                  "(FLOPs counted on our run; grid_sample etc. not counted)",
              f"{'stage':22s} {'reference':>10s} {'ours':>10s} {'share':>7s} {'GFLOP':>8s} {'ref GF/s':>9s} "
              f"{'ours GF/s':>9s} {'re-prompt':>10s}"]
    flops = res.notes.get("flops", {})
    ours_total = sum(median(v) for v in res.stages.get("ours", {}).values())
    for stage in ("dino_backbone", "dino_text_decoder", "sam_encoder", "sam_decoder_post", "other"):
        r = median(res.stages.get("reference", {}).get(stage, []))
        o = median(res.stages.get("ours", {}).get(stage, []))
        rp = median(res.stages.get("ours_reprompt", {}).get(stage, []))
        gf = flops.get(stage, 0.0) / 1e9
        lines.append(f"{stage:22s} {r * scale:10.2f} {o * scale:10.2f} {o / ours_total:7.1%} {gf:8.1f} "
                     f"{(gf / r if gf and r > 0 else float('nan')):9.1f} "
                     f"{(gf / o if gf and o > 0 else float('nan')):9.1f} "
                     f"{rp * scale:10.2f}")
    lines += ["", "Speed options and their output difference against the fp32 reference:"]
    for line in info.get("options", []):
        lines.append(f"  - {line}")
    return "\n".join(lines)


def print_log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="fewer repeats, 512 px Grounding DINO input, 4-task batch")
    group.add_argument("--smoke", action="store_true", help="tiny random models: a seconds-long check of the script")
    parser.add_argument("--repeats", type=int, help="cold tasks per side (default: 3, quick/smoke 2)")
    parser.add_argument("--batch-tasks", type=int, help="tasks in the /predict batch comparison (default 16)")
    parser.add_argument("--cache", type=Path, help=f"model cache folder (default {DEFAULT_CACHE})")
    parser.add_argument("--skip", action="append", default=[], choices=["batch", "memory", "precision"])
    parser.add_argument("--json", type=Path, help="also write every raw figure here")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where both chains run (default: cuda if available)")
    parser.add_argument("--sam", choices=SAM_VARIANTS, default="vit_b",
                        help="SAM size of both chains, real-size models only (default vit_b)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                        help="the engine's precision (default: PRECISION, else auto: on CPU bf16 where it has "
                             "native bf16 (AMX, AVX-512 BF16), else fp32; bf16 on GPU, fp16 where bf16 is "
                             "unsupported); the reference runs fp32")
    parser.add_argument("--runtime", choices=["auto", "torch", "openvino"], default="auto",
                        help="what runs SAM's image encoder in our engine (RUNTIME; default auto: OpenVINO on CPU); "
                             "off torch, an extra row compares its masks with torch fp32's on the same boxes")
    parser.add_argument("--jobs", type=int, metavar="TASKS",
                        help="instead: the job machinery's overhead on TASKS tasks (tiny models; bench/jobs.py)")
    parser.add_argument("--memory-probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--explanations", choices=["on", "off"], help=argparse.SUPPRESS)
    parser.add_argument("--dino-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from backend.config import PRECISIONS
    from backend.models import ModelLoadError, cpu_bf16_kind, cpu_flags, resolve_device, resolve_precision

    try:
        device = resolve_device(args.device).type  # the engine's own choice: cuda if available
    except ModelLoadError as exc:
        parser.error(str(exc))
    # Without --precision, the engine's own setting (PRECISION, default auto) decides, as in the backend.
    setting = os.environ.get("PRECISION") or "auto"
    if setting not in PRECISIONS:
        parser.error(f"PRECISION must be one of {PRECISIONS}, got {setting!r}")
    precision = args.precision or resolve_precision(setting, torch.device(device))

    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.explanations == "on", args.dino_size, device, precision,
                                      args.runtime)))
        return 0

    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "default"]
    if args.jobs is not None:
        from bench import jobs

        if args.jobs < 1:
            parser.error("--jobs needs at least 1 task")
        engine_json, _ = model_cache(MODES["smoke"], args.cache)
        info = {**machine(device), "mode": "jobs", "device": device}
        return jobs.main(args.jobs, engine_json, info, args.json, print_log)
    if args.smoke and args.sam != "vit_b":
        parser.error("--sam applies to the real-size models; --smoke runs the tiny ones")
    mode.device, mode.sam_variant, mode.precision, mode.runtime = device, args.sam, precision, args.runtime
    if args.repeats:
        mode.repeats = args.repeats
    if args.batch_tasks:
        mode.batch_tasks = args.batch_tasks
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    info = machine(device)
    info["lscpu"] = rt.lscpu()
    on_cpu = device == "cpu"
    # A GPU needs a large product to approach its peak; on CPU bf16 can run at ~1 GFLOP/s without native
    # support, so its probe stays small there.
    info.update(mode=mode.name, device=device, precision=precision, matmul_n=2048 if on_cpu else 8192,
                models=f"{mode.sam_variant} + SwinT-OGC, real size, random weights" if mode.real
                else "tiny random models")
    info.update(matmul_fp32=matmul_gflops(torch.float32, n=info["matmul_n"], device=device),
                matmul_bf16=matmul_gflops(torch.bfloat16, n=(512 if mode.real else 256) if on_cpu else info["matmul_n"],
                                          reps=2 if on_cpu else 5, device=device))
    engine_json, ref_files = model_cache(mode, args.cache)
    log(f"model cache {engine_json.parent}")
    res = Results()
    with tempfile.TemporaryDirectory() as tmp:
        engine, _ = run_tasks(mode, engine_json, ref_files, Path(tmp), res, log)
        res.notes["capture_overhead"] = rt.capture_overhead(engine, photos(1)[0], mode.repeats)
        res.notes["conversion"] = rt.conversion_figures(engine)  # now with the graph kind the probe added
        log(f"SAM encoder with / without capture: {json.dumps(res.notes['capture_overhead'])}")
        if "precision" not in args.skip:
            same_box_precision_iou(engine, res, log)
        if "batch" not in args.skip:
            run_batch(engine, mode, res, log)
    del engine
    if "memory" not in args.skip:
        run_memory(engine_json, mode, res, log)
    info["load_avg_end"] = os.getloadavg()[0]
    probs_diff, boxes_diff = res.notes["detector_max_abs_diff"]
    info["options"] = [
        f"Grounding DINO without activation checkpointing + embedding_bag deformable attention (default on): "
        f"max abs diff vs groundingdino's fp32 forward, ours in {precision}: {probs_diff:.1e} (token probabilities), "
        f"{boxes_diff:.1e} (boxes)" + ("" if precision == "fp32" else
                                        " (query by query: reduced precision reorders the top-900 query selection "
                                        "of near-tied random-weight scores, so the mask IoU is the figure to read)"),
        "SDPA attention in SAM's encoder (default on): same math, masks equal (IoU above)",
        "cached Grounding DINO image features + SAM embedding for re-prompts (default on): exact reuse",
        "freed memory kept in the heap (REUSE_FREED_MEMORY, default on for CPU): no output change; it is "
        "process-wide, so the reference chain timed in this process runs with it too (ratios conservative)",
    ]
    speed = f"bf16 matmul here {info['matmul_bf16']:.0f} vs {info['matmul_fp32']:.0f} GFLOP/s fp32"
    if device == "cuda":
        usage = "the GPU default"
    elif kind := cpu_bf16_kind(cpu_flags()):
        usage = f"the CPU default here: this CPU has native bf16 ({kind}); PRECISION=fp32 opts out"
    else:
        usage = "opt-in on CPU; this CPU has no native bf16 (AMX, AVX-512 BF16), so auto stays fp32"
    info["options"].append(f"bf16 autocast (PRECISION=bf16, {usage}): {speed}; its mask IoU against the fp32 "
                           "reference is the IoU row of a run with --precision bf16")
    text = report(res, info)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "rows": res.rows, "stages": res.stages, "notes": res.notes},
                                        indent=2, default=str))
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
