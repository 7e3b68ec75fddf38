"""Write a tiny model cache: real architectures, random weights, real checkpoint formats.

    python -m tests.tiny_models --out DIR

writes into DIR
  tiny_sam_vit_b.pth       segment_anything ImageEncoderViT-based SAM (small dims), torch.save(state_dict)
  tiny_mobile_sam.pt       MobileSAM vit_t (its fixed TinyViT; random weights), torch.save(state_dict)
  tiny_groundingdino.pth   groundingdino model (small Swin + transformer), torch.save({"model": state_dict})
  tiny-bert/               a small BertModel + tokenizer saved with save_pretrained (local text encoder)
  engine.json              EngineConfig for SAM + Grounding DINO above (ENGINE_CONFIG=DIR/engine.json)
  engine-mobilesam.json    the same with MobileSAM
The engine loads these through its production loading code (backend.models).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

SEED = 0

TINY_SAM_ARCH: dict[str, Any] = dict(
    encoder_embed_dim=64, encoder_depth=4, encoder_num_heads=2, encoder_global_attn_indexes=[1, 3]
)
TINY_DINO_ARCH: dict[str, Any] = dict(
    # hidden_dim stays 256: groundingdino hardcodes it for text positions
    enc_layers=1, dec_layers=2, dim_feedforward=128, num_queries=60,
    use_checkpoint=False, use_transformer_ckpt=False,
    swin=dict(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], window_size=7),
)
TINY_DINO_IMAGE_SIZE = 320
TINY_DINO_MAX_SIZE = 533

# Words used by the tests' prompts and Label Studio configs; "mini" + "##van" lets a test check that a
# sub-word phrase ("minivan") still maps to the phrase that was asked for.
VOCAB_WORDS = [
    "cat", "dog", "car", "person", "astronaut", "rocket", "coffee", "cup", "flag", "van", "taxi", "mini",
    "##van", "##s", "tree", "sky", "face", "hand", "building", "road", "bird", "horse", "boat", "the", "a",
    "red", "blue", "green", "big", "small", "chair", "table", "camera", "man", "woman", "coin", "moon",
]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PUNCTUATION = [".", ",", "?", "!", "-", "'"]


def write_tiny_bert(out: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = out / "tiny-bert"
    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL_TOKENS + PUNCTUATION + sorted(set(VOCAB_WORDS)) + list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512,
    )
    torch.manual_seed(SEED)
    BertModel(config).save_pretrained(folder)
    return folder


def write_tiny_sam(out: Path) -> Path:
    from backend.config import EngineConfig
    from backend.models import build_sam_architecture

    torch.manual_seed(SEED)
    sam = build_sam_architecture(EngineConfig(sam_variant="vit_b", sam_arch=TINY_SAM_ARCH))
    path = out / "tiny_sam_vit_b.pth"
    torch.save(sam.state_dict(), path)
    return path


def write_tiny_mobile_sam(out: Path) -> Path:
    from backend.config import EngineConfig
    from backend.models import build_sam_architecture

    torch.manual_seed(SEED)
    path = out / "tiny_mobile_sam.pt"
    torch.save(build_sam_architecture(EngineConfig(sam_variant="vit_t")).state_dict(), path)
    return path


def write_tiny_grounding_dino(out: Path, text_encoder: Path) -> Path:
    # Built by the production builder (SLConfig + arch overrides), saved as the official files are.
    from backend.config import EngineConfig
    from backend.models import build_grounding_dino_architecture

    config = EngineConfig(cache_dir=out, text_encoder=text_encoder.name, dino_arch=TINY_DINO_ARCH)
    torch.manual_seed(SEED)
    model = build_grounding_dino_architecture(config)
    path = out / "tiny_groundingdino.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def write_cache(out: Path, mobile_sam: bool = True) -> Path:
    """Write every tiny model and the engine configs into ``out``; returns ``out/engine.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bert = write_tiny_bert(out)
    sam = write_tiny_sam(out)
    dino = write_tiny_grounding_dino(out, bert)
    common = dict(
        cache_dir=".", dino_variant="swint_ogc", dino_checkpoint=dino.name, dino_arch=TINY_DINO_ARCH,
        text_encoder=bert.name, dino_image_size=TINY_DINO_IMAGE_SIZE, dino_max_size=TINY_DINO_MAX_SIZE,
        # Random weights match many boxes; SAM's decoder costs ~0.3 s a box on CPU, so keep tests quick.
        max_detections=8,
        # The tests' reference checks are fp32 claims; PRECISION=auto would be bf16 on CPUs with native
        # bf16 (backend/models.py), so results and model versions would depend on the machine. The
        # PRECISION variable still overrides this (ENGINE_CONFIG + env), as for any engine config.
        precision="fp32",
    )
    engine_json = out / "engine.json"
    engine_json.write_text(json.dumps(
        dict(common, sam_variant="vit_b", sam_checkpoint=sam.name, sam_arch=TINY_SAM_ARCH), indent=2))
    if mobile_sam:
        mobile = write_tiny_mobile_sam(out)
        (out / "engine-mobilesam.json").write_text(json.dumps(
            dict(common, sam_variant="vit_t", sam_checkpoint=mobile.name), indent=2))
    return engine_json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder to write the tiny model cache into")
    parser.add_argument("--no-mobile-sam", action="store_true", help="skip MobileSAM (its TinyViT is ~40 MB)")
    args = parser.parse_args(argv)
    print(write_cache(args.out, mobile_sam=not args.no_mobile_sam))


if __name__ == "__main__":
    main()
