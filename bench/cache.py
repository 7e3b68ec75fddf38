"""A model cache of real-size architectures with random weights, in the real checkpoint formats.

    python -m bench.cache --out DIR [--sam vit_b|vit_l|vit_h]

writes into DIR
  bench_sam_<variant>.pth         segment_anything's builder of the variant (no checkpoint), torch.save(state_dict)
  bench_groundingdino_swint.pth   Grounding DINO SwinT-OGC, torch.save({"model": state_dict})
  bench-bert/                     BertModel with bert-base-uncased's config (random), save_pretrained
  GroundingDINO_SwinT_OGC_bench.py  the shipped SwinT-OGC config with text_encoder_type = bench-bert
  engine-<variant>.json           EngineConfig for the project's loading code
Timing needs the real sizes, not trained weights; nothing is downloaded. File names differ from the
official ones so nobody mistakes them for real checkpoints (and the manifest's sha256 never applies).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SEED = 0
SAM_VARIANTS = ("vit_b", "vit_l", "vit_h")
DINO_FILE = "bench_groundingdino_swint.pth"
BERT_DIR = "bench-bert"
DINO_CONFIG_FILE = "GroundingDINO_SwinT_OGC_bench.py"
BERT_VOCAB_SIZE = 30522  # bert-base-uncased
DECODER_NORM_SCALE = 0.1


def write_bert(out: Path) -> Path:
    """bert-base-uncased's architecture (12 x 768) with random weights and a stand-in vocabulary.

    The vocabulary has the real size and the tokens prompts need; the rest are [unusedN] fillers.
    """
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from tests.tiny_models import PUNCTUATION, SPECIAL_TOKENS, VOCAB_WORDS

    folder = out / BERT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    vocab = list(dict.fromkeys(
        SPECIAL_TOKENS + PUNCTUATION + sorted(set(VOCAB_WORDS)) + list("abcdefghijklmnopqrstuvwxyz0123456789")
        + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]))
    vocab += [f"[unused{i}]" for i in range(BERT_VOCAB_SIZE - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(SEED)
    BertModel(BertConfig(vocab_size=BERT_VOCAB_SIZE)).save_pretrained(folder)  # defaults = bert-base
    return folder


def sam_file(variant: str) -> str:
    return f"bench_sam_{variant}.pth"


def write_sam(out: Path, variant: str) -> Path:
    from segment_anything import sam_model_registry

    torch.manual_seed(SEED)
    path = out / sam_file(variant)
    torch.save(sam_model_registry[variant](checkpoint=None).state_dict(), path)
    return path


def write_dino_config(out: Path, bert: Path) -> Path:
    """The shipped SwinT-OGC config, pointing at the local BERT (what the reference chain loads)."""
    import groundingdino

    shipped = Path(groundingdino.__file__).parent / "config" / "GroundingDINO_SwinT_OGC.py"
    text = shipped.read_text().replace('text_encoder_type = "bert-base-uncased"',
                                       f"text_encoder_type = {str(bert)!r}")
    if str(bert) not in text:
        raise RuntimeError(f"{shipped} has no text_encoder_type line to point at {bert}")
    path = out / DINO_CONFIG_FILE
    path.write_text(text)
    return path


def write_dino(out: Path) -> Path:
    from backend.config import EngineConfig
    from backend.models import build_grounding_dino_architecture

    torch.manual_seed(SEED)
    model = build_grounding_dino_architecture(EngineConfig(cache_dir=out, text_encoder=BERT_DIR))
    # Random init saturates every query's text logit (|hs . text| ~ 16): shrink the decoder's last
    # norm so scores spread over (0, 1) and thresholds pick a realistic handful of boxes.
    with torch.no_grad():
        model.transformer.decoder.norm.weight.mul_(DECODER_NORM_SCALE)
    path = out / DINO_FILE
    torch.save({"model": model.state_dict()}, path)
    return path


def write_cache(out: Path, sam_variant: str = "vit_b") -> Path:
    """Write (once) every file above into ``out``; returns ``out/engine-<sam_variant>.json``."""
    if sam_variant not in SAM_VARIANTS:
        raise ValueError(f"SAM variant must be one of {SAM_VARIANTS}, got {sam_variant!r}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    engine_json = out / f"engine-{sam_variant}.json"
    if engine_json.is_file():
        return engine_json
    bert = out / BERT_DIR if (out / BERT_DIR / "config.json").is_file() else write_bert(out)
    if not (out / sam_file(sam_variant)).is_file():
        write_sam(out, sam_variant)
    if not (out / DINO_FILE).is_file():
        write_dino(out)
    write_dino_config(out, bert)
    engine_json.write_text(json.dumps(dict(
        cache_dir=".", sam_variant=sam_variant, sam_checkpoint=sam_file(sam_variant), dino_variant="swint_ogc",
        dino_checkpoint=DINO_FILE, text_encoder=BERT_DIR), indent=2))
    return engine_json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--sam", default="vit_b", choices=SAM_VARIANTS)
    args = parser.parse_args(argv)
    print(write_cache(args.out, args.sam))


if __name__ == "__main__":
    main()
