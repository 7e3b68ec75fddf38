"""SAM's prompt encoder + mask decoder for B boxes of one image: segment_anything's own (``MaskDecoder``,
single-mask output, under autocast for bf16, as the engine ran it before) against ``backend.box_decoder``.

    python -m bench.box_decoder [--cache DIR] [--rounds 3] [--json OUT]

Real size (bench/cache.py's random-weight vit_b checkpoint: every SAM variant has this decoder; the tiny
models' cache works too, their decoder is SAM's size), one
image embedding, 1, 4 and 16 boxes; per round, per box count, each form in turn (interleaved). Accuracy
against segment_anything in fp32 on the same boxes: the logits' max abs difference, the share of mask
pixels (logit > 0) that agree, and the IoU prediction's max abs difference.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable

import torch

BOX_COUNTS = (1, 4, 16)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    from backend.box_decoder import BoxDecoder
    from backend.config import EngineConfig
    from backend.models import build_sam
    from bench.component import arguments, interleave, machine_info, print_header

    args = arguments(__doc__ or "")
    info = machine_info()
    config_file = args.cache / "engine-vit_b.json"  # bench/cache.py's; tests.tiny_models' cache has engine.json
    sam = build_sam(EngineConfig.from_file(config_file if config_file.is_file() else args.cache / "engine.json")).eval()
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(1, 256, 64, 64, generator=generator)
    boxes = {}
    for count in BOX_COUNTS:
        corners = torch.rand(count, 4, generator=generator) * 1024
        boxes[f"{count} boxes"] = torch.cat([corners[:, :2].minimum(corners[:, 2:]),
                                             corners[:, :2].maximum(corners[:, 2:])], 1)

    def stock(dtype: torch.dtype) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        @torch.inference_mode()
        def run(box_tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                sparse, dense = sam.prompt_encoder(points=None, boxes=box_tensor, masks=None)
                masks, ious = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                               multimask_output=False)
            return masks[:, 0].float(), ious[:, 0].float()
        return run

    def ours(dtype: torch.dtype) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        decoder = BoxDecoder(sam.prompt_encoder, sam.mask_decoder, dtype)
        return lambda box_tensor: decoder(embedding, box_tensor)

    forms = {**{f"segment_anything {name}": stock(dtype) for name, dtype in DTYPES.items()},
             **{f"BoxDecoder {name}": ours(dtype) for name, dtype in DTYPES.items()}}
    reference = {label: stock(torch.float32)(value) for label, value in boxes.items()}

    def accuracy(output: tuple[torch.Tensor, torch.Tensor], label: str) -> dict[str, float]:
        (masks, ious), (want_masks, want_ious) = output, reference[label]
        return {"max_diff": float((masks - want_masks).abs().max()),
                "pixels_agree": float(((masks > 0) == (want_masks > 0)).float().mean()),
                "iou_diff": float((ious - want_ious).abs().max())}

    timed = interleave(args.rounds, boxes, forms, accuracy)
    print_header(info, "SAM prompt encoder + mask decoder, one image", args.rounds)
    print("form                    boxes      median ms  first ms  vs segment_anything (same dtype)  "
          "max|diff|  pixels agree  iou |diff|")
    rows = []
    for label in boxes:
        for name in forms:
            dtype_name = name.split()[-1]
            base = statistics.median(timed.times[(f"segment_anything {dtype_name}", label)])
            ms = statistics.median(timed.times[(name, label)]) * 1e3
            a = timed.accuracy[(name, label)]
            rows.append({"form": name, "boxes": label, "median_ms": ms, "first_ms": timed.first[(name, label)] * 1e3,
                         "rounds_s": timed.times[(name, label)], **a})
            print(f"{name:23} {label:9} {ms:10.1f} {timed.first[(name, label)] * 1e3:9.1f} "
                  f"{ms / base / 1e3:31.2f}x  {a['max_diff']:9.1e} {a['pixels_agree']:13.5f} {a['iou_diff']:11.1e}")
    print("(accuracy against segment_anything fp32 on the same boxes)")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
