"""Command line: ``python -m backend segment IMAGE --prompt "cat . dog" [--out overlay.png]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from PIL import Image


def _segment(args: argparse.Namespace) -> int:
    from .config import EngineConfig
    from .engine import Engine
    from .render import draw_segments

    engine = Engine(EngineConfig.from_env())
    image = engine.load_image(args.image)
    segments = engine.segment(image, args.prompt, args.box_threshold, args.text_threshold)
    rows = [{"label": s.label, "score": round(s.score, 4), "predicted_iou": round(s.predicted_iou, 4),
             "box": [round(v, 1) for v in s.box], "area": s.area} for s in segments]
    print(json.dumps({"model_version": engine.model_version, "image": str(args.image),
                      "size": list(image.shape[1::-1]), "segments": rows}, indent=2))
    if args.out:
        Image.fromarray(draw_segments(image, segments, show_labels=not args.no_labels)).save(args.out)
        print(f"overlay written to {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend", description="Explainable Grounded SAM engine")
    commands = parser.add_subparsers(dest="command", required=True)
    segment = commands.add_parser("segment", help="segment one image with a text prompt (models from env)")
    segment.add_argument("image", type=Path)
    segment.add_argument("--prompt", required=True, help='phrases separated by ".", e.g. "cat . dog"')
    segment.add_argument("--box-threshold", type=float, default=None)
    segment.add_argument("--text-threshold", type=float, default=None)
    segment.add_argument("--out", type=Path, help="write an overlay PNG here")
    segment.add_argument("--no-labels", action="store_true", help="don't print labels on the overlay")
    segment.set_defaults(run=_segment)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:  # our errors carry clear messages
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
