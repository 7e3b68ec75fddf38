"""Grounding DINO: text phrases -> labelled boxes.

The model's forward is split in two so the text-independent half (Swin backbone + input
projections) can be cached per image and reused when only the prompt changes. Each box is scored
per *requested phrase* from the token logits of that phrase's tokens, so merged or sub-word outputs
("##van", "car taxi") can't produce a label nobody asked for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torchvision.ops import batched_nms, box_convert, clip_boxes_to_image

from . import dino_fast
from .dino_graph import DinoTextInputs
from .types import Detection

if TYPE_CHECKING:
    from .dino_image_runtime import DinoImageRuntime
    from .dino_runtime import DinoTextRuntime
    from .dino_weights import ReloadedDino

MAX_TEXT_TOKENS = 256  # Grounding DINO's max_text_len
# Tokens Grounding DINO reads as the end of a phrase (GroundingDINO.specical_tokens, less [CLS]/[SEP]).
SEPARATOR_TOKENS = (".", "?")


class PromptError(ValueError):
    """The prompt can't be used: empty, or too long for the text encoder."""


def parse_prompt(prompt: str | Sequence[str]) -> list[str]:
    """``"cat . dog"`` or ``["cat", "dog"]`` -> ``["cat", "dog"]``: stripped, de-duplicated (case-insensitive)."""
    pieces = prompt.split(".") if isinstance(prompt, str) else [str(p) for p in prompt]
    phrases: list[str] = []
    seen: set[str] = set()
    for piece in pieces:
        phrase = " ".join(piece.split())
        if phrase and phrase.lower() not in seen:
            seen.add(phrase.lower())
            phrases.append(phrase)
    if not phrases:
        raise PromptError("prompt is empty: give at least one phrase, e.g. 'cat . dog'")
    return phrases


# HF fast tokenizers are not thread-safe: a call that changes the Rust tokenizer's padding or
# truncation settings while another thread encodes raises "RuntimeError: Already borrowed". Every use
# of a tokenizer here goes through this lock (encoding a caption takes microseconds).
_TOKENIZER_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Encoding:
    input_ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]  # (start, end) character span of each token in the text
    tokens: tuple[str, ...]
    model_inputs: tuple[tuple[str, tuple[int, ...]], ...]  # what BERT reads: input_ids, token_type_ids, ...


def _encode(text: str, tokenizer: Any) -> _Encoding:
    """Tokenize ``text`` once, under the tokenizer lock, with fixed settings (no padding, no truncation)."""
    with _TOKENIZER_LOCK:
        # verbose=False: a prompt longer than BERT's 512 positions is only counted here, then split.
        encoded = tokenizer(text, return_offsets_mapping=True, padding=False, truncation=False, verbose=False)
        tokens = tuple(tokenizer.convert_ids_to_tokens(encoded["input_ids"]))
    return _Encoding(
        input_ids=tuple(encoded["input_ids"]),
        offsets=tuple((int(a), int(b)) for a, b in encoded["offset_mapping"]),
        tokens=tokens,
        model_inputs=tuple((k, tuple(v)) for k, v in encoded.items() if k != "offset_mapping"),
    )


def _caption_text(phrases: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The text Grounding DINO reads for ``phrases`` and each phrase's character span in it.

    Same text groundingdino.util.inference.preprocess_caption makes of "a . b": lower-case, ending in
    '.'. Spans are measured on the lower-cased text actually written: lower() may change the length
    ("İ" -> "i̇" is two characters).
    """
    text, spans = "", []
    for i, phrase in enumerate(phrases):
        if i:
            text += " . "
        lowered = phrase.lower()
        spans.append((len(text), len(text) + len(lowered)))
        text += lowered
    return text + " .", spans


def _tokenize_phrases(phrases: Sequence[str], tokenizer: Any) -> tuple[str, _Encoding, list[tuple[int, ...]]]:
    """The caption text of ``phrases`` (separators inside a phrase blanked, see ``Caption.build``), its
    encoding, and the token indices of each phrase (empty for a phrase the text encoder has no token for)."""
    text, spans = _caption_text(phrases)
    encoding = _encode(text, tokenizer)
    with _TOKENIZER_LOCK:
        separators = set(tokenizer.convert_tokens_to_ids(list(SEPARATOR_TOKENS))) - {tokenizer.unk_token_id}
    inside = [(a, b) for token_id, (a, b) in zip(encoding.input_ids, encoding.offsets, strict=True)
              if token_id in separators and b > a and any(start <= a and b <= end for start, end in spans)]
    if inside:  # blanked in place: every span keeps its place in the text
        chars = list(text)
        for a, b in inside:
            chars[a:b] = " " * (b - a)
        text = "".join(chars)
        encoding = _encode(text, tokenizer)
    phrase_tokens = [tuple(i for i, (a, b) in enumerate(encoding.offsets) if b > a and a >= start and b <= end)
                     for start, end in spans]
    return text, encoding, phrase_tokens


def _check_fits(phrase: str, tokens: int, max_tokens: int) -> None:
    """PromptError naming the limit unless a caption of ``phrase`` alone ([CLS], its tokens, '.', [SEP]) fits."""
    if tokens + 3 > max_tokens:
        raise PromptError(f"phrase {phrase[:80]!r} is too long: {tokens} tokens, Grounding DINO reads at most "
                          f"{max_tokens} per pass; shorten it")


def readable_phrases(phrases: Sequence[str], tokenizer: Any,
                     max_tokens: int = MAX_TEXT_TOKENS) -> tuple[list[str], list[str]]:
    """(the phrases the text encoder reads, those it has no token for: "...", a lone combining accent),
    so a prompt can leave the unreadable ones out instead of failing every task on them. PromptError
    naming the limit when one phrase alone is longer than a detector pass reads (no split can help)."""
    _, _, phrase_tokens = _tokenize_phrases(phrases, tokenizer)
    for phrase, indices in zip(phrases, phrase_tokens, strict=True):
        _check_fits(phrase, len(indices), max_tokens)
    kept = [p for p, indices in zip(phrases, phrase_tokens, strict=True) if indices]
    return kept, [p for p, indices in zip(phrases, phrase_tokens, strict=True) if not indices]


@dataclass(frozen=True)
class Caption:
    """The text Grounding DINO reads, its encoding, and which tokens belong to which requested phrase."""

    text: str
    phrases: tuple[str, ...]
    phrase_tokens: tuple[tuple[int, ...], ...]  # token indices of each phrase
    tokens: tuple[str, ...]  # every token of the caption (incl. [CLS], '.', [SEP])
    # The text encoder's inputs (input_ids, token_type_ids, attention_mask), one value per token: the
    # caption is tokenized once, and the model reads the same encoding the spans were measured on.
    model_inputs: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @classmethod
    def build(cls, phrases: Sequence[str], tokenizer: Any, max_tokens: int | None = MAX_TEXT_TOKENS) -> Caption:
        """One caption for all ``phrases``; PromptError when it is longer than ``max_tokens`` (None: no limit)
        or a phrase has no token the text encoder knows.

        A character inside a phrase that reads as one of Grounding DINO's phrase separators ('.' or '?':
        "St. Bernard", "a.b", "cat?") is written as a space: read as a separator it would cut the phrase
        in two for the text self-attention, and the separator's own score would count as the phrase's.
        """
        text, encoding, phrase_tokens = _tokenize_phrases(phrases, tokenizer)
        if max_tokens is not None and len(encoding.input_ids) > max_tokens:
            raise PromptError(
                f"prompt is too long: {len(encoding.input_ids)} tokens, Grounding DINO reads at most "
                f"{max_tokens}; use fewer or shorter phrases"
            )
        for phrase, indices in zip(phrases, phrase_tokens, strict=True):
            if not indices:
                raise PromptError(f"phrase {phrase!r} has no tokens the text encoder knows")
        return cls(text=text, phrases=tuple(phrases), phrase_tokens=tuple(phrase_tokens), tokens=encoding.tokens,
                   model_inputs=encoding.model_inputs)

    @classmethod
    def split(cls, phrases: Sequence[str], tokenizer: Any, max_tokens: int = MAX_TEXT_TOKENS) -> list[Caption]:
        """Captions that each fit ``max_tokens``, phrases in order, as few as greedy packing gives.

        One caption when everything fits (the same one ``build`` makes). A big taxonomy (hundreds of
        labels) becomes several detector passes; PromptError when one phrase alone is too long.
        """
        whole = cls.build(phrases, tokenizer, max_tokens=None)
        if len(whole.tokens) <= max_tokens:
            return [whole]
        groups: list[list[str]] = [[]]
        used = 2  # [CLS] and [SEP]
        for phrase, indices in zip(phrases, whole.phrase_tokens, strict=True):
            cost = len(indices) + 1  # the phrase and its '.'
            _check_fits(phrase, len(indices), max_tokens)
            if groups[-1] and used + cost > max_tokens:
                groups.append([])
                used = 2
            groups[-1].append(phrase)
            used += cost
        return [cls.build(group, tokenizer, max_tokens) for group in groups]


def prepare(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device`` for inference, as the detector and both text runtimes run it: eval mode,
    checkpointing off, deformable attention as one embedding_bag gather (``dino_fast``: same outputs).
    Idempotent."""
    model = model.to(device).eval()
    dino_fast.use_fast_inference(model)
    return model


def _at_least_one_pixel(image: Image.Image, max_size: int) -> Image.Image:
    """``image`` unchanged, unless its long side is so much longer than the short one that
    groundingdino's resize (long side -> max_size) would round the short side to 0 px: then it is
    stretched along the short side to the least that keeps it >= 1 px (boxes come back normalised,
    so they still map onto the original image)."""
    short, long = sorted(image.size)
    if round(max_size * short / long) >= 1:
        return image
    stretch = -(-long // max_size)  # short side after stretching: resized to exactly 1 px
    width, height = image.size
    return image.resize((width, stretch) if width == long else (stretch, height), Image.Resampling.NEAREST)


@dataclass
class DinoImageFeatures:
    """Backbone outputs after the input projections: everything in the forward that ignores text."""

    srcs: list[torch.Tensor]
    masks: list[torch.Tensor]
    poss: list[torch.Tensor]
    image_size: tuple[int, int]  # original H, W


@dataclass(frozen=True)
class RawPredictions:
    """All queries: sigmoid token logits (num_queries x num_tokens) and normalised cxcywh boxes."""

    token_probs: torch.Tensor
    boxes_cxcywh: torch.Tensor


class GroundingDinoDetector:
    """Wraps a loaded groundingdino model; stateless between calls, so threads may share it."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        image_size: int = 800,
        max_size: int = 1333,
        text_runtime: DinoTextRuntime | None = None,
        image_runtime: DinoImageRuntime | None = None,
    ) -> None:
        """``text_runtime``: what runs the text half (``dino_runtime``), made for this ``model`` by
        ``dino_runtime.build_dino_text_runtime`` after ``prepare``; None: torch. ``image_runtime``:
        what runs the image half (``dino_image_runtime.build_dino_image_runtime``); None: torch."""
        self.model = prepare(model, device)
        if text_runtime is None:
            from .dino_runtime import TorchDinoText

            text_runtime = TorchDinoText(self.model, dtype)
        if image_runtime is None:
            from .dino_image_runtime import TorchDinoImage

            image_runtime = TorchDinoImage(self.model, dtype)
        self.text_runtime = text_runtime
        self.image_runtime = image_runtime
        self.device = device
        self.dtype = dtype
        self.image_size = image_size
        self.max_size = max_size
        self.max_text_tokens = MAX_TEXT_TOKENS  # tokens per detector pass (Grounding DINO's max_text_len)
        # Set by dino_weights.release_torch_weights once both halves run on OpenVINO and ``model``'s
        # weights are freed: where the torch model comes from then.
        self.reloaded: ReloadedDino | None = None

    def torch_model(self) -> torch.nn.Module:
        """The torch model with its weights: ``model``, or (once the engine freed its weights for
        OpenVINO) the model loaded again from the checkpoint."""
        if self.reloaded is None:
            return self.model
        return self.reloaded.get("the torch model was asked for")

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """groundingdino.util.inference.load_image's transform: resize shorter side, normalise."""
        import groundingdino.datasets.transforms as T

        transform = T.Compose([
            T.RandomResize([self.image_size], max_size=self.max_size),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ])
        tensor, _ = transform(_at_least_one_pixel(Image.fromarray(image), self.max_size), None)
        return tensor

    def image_features(self, image: np.ndarray) -> DinoImageFeatures:
        """The text-independent half of GroundingDINO.forward for one image, run by ``image_runtime``.

        Arguments:
          image: H x W x 3 uint8 RGB.
        Returns:
          ``DinoImageFeatures``: four levels of 1 x 256 x h_l x w_l features and positions (the resized
          image's stride 8, 16, 32, 64), their padding masks (all False), and the image's (H, W).
        """
        levels = self.image_runtime.run(self.preprocess(image).to(self.device))
        return DinoImageFeatures(srcs=levels.srcs, masks=levels.masks, poss=levels.poss, image_size=image.shape[:2])

    def text_inputs(self, features: DinoImageFeatures, caption: Caption) -> DinoTextInputs:
        """What the text half reads for ``caption`` over ``features`` (``dino_graph.DinoTextInputs``)."""
        from groundingdino.models.GroundingDINO.bertwarper import generate_masks_with_special_tokens_and_transfer_map

        # The caption's own encoding (one text: no padding), not a second tokenizer call.
        tokenized = {name: torch.tensor([values], dtype=torch.long, device=self.device)
                     for name, values in caption.model_inputs}
        ids = tokenized["input_ids"]
        self_attention_masks, position_ids, _ = generate_masks_with_special_tokens_and_transfer_map(
            tokenized, self.model.specical_tokens, None)
        mask = tokenized.get("attention_mask", torch.ones_like(ids))
        return DinoTextInputs(
            srcs=tuple(features.srcs), masks=tuple(features.masks), poss=tuple(features.poss), input_ids=ids,
            token_type_ids=tokenized.get("token_type_ids", torch.zeros_like(ids)), text_token_mask=mask.bool(),
            text_self_attention_masks=self_attention_masks, position_ids=position_ids)

    def raw_predictions(self, features: DinoImageFeatures, caption: Caption) -> RawPredictions:
        """The text half of GroundingDINO.forward, run over cached image features by ``text_runtime``."""
        logits, boxes = self.text_runtime.run(self.text_inputs(features, caption))
        # ContrastiveEmbed's padding to max_text_len columns: sigmoid(-inf) = 0 past the caption.
        probs = logits[0].sigmoid()
        token_probs = probs.new_zeros(probs.shape[0], max(MAX_TEXT_TOKENS, probs.shape[1]))
        token_probs[:, : probs.shape[1]] = probs
        return RawPredictions(token_probs=token_probs, boxes_cxcywh=boxes[0])

    def detect(
        self,
        features: DinoImageFeatures,
        phrases: Sequence[str],
        box_threshold: float,
        text_threshold: float,
        nms_iou: float,
        max_detections: int,
        predictions: Callable[[Caption], RawPredictions] | None = None,
    ) -> list[Detection]:
        """Boxes whose best requested phrase scores above both thresholds, after per-label NMS, best
        ``max_detections`` first.

        ``predictions`` gives a caption's ``RawPredictions`` over these features (the engine's cache:
        they don't depend on the thresholds); None runs the text half (``raw_predictions``).

        A prompt longer than the text encoder reads (``max_text_tokens``) runs as several passes over
        the same image features (``Caption.split``); each phrase is in exactly one pass, so per-label
        NMS within a pass is per-label NMS overall, and the passes' detections merge by score. A
        detection's ``phrase_scores``/``token_scores`` then cover the phrases of its own pass.
        """
        captions = Caption.split(phrases, self.tokenizer, self.max_text_tokens)
        if predictions is None:
            def predictions(caption: Caption) -> RawPredictions:
                return self.raw_predictions(features, caption)

        detections = [
            detection
            for caption in captions
            for detection in select_detections(predictions(caption), caption,
                                               features.image_size, box_threshold, text_threshold, nms_iou,
                                               max_detections)
        ]
        if len(captions) == 1:
            return detections
        return sorted(detections, key=lambda d: d.score, reverse=True)[:max_detections]


def select_detections(
    raw: RawPredictions,
    caption: Caption,
    image_size: tuple[int, int],
    box_threshold: float,
    text_threshold: float,
    nms_iou: float,
    max_detections: int,
) -> list[Detection]:
    """Score each query per phrase (max over the phrase's tokens), threshold, NMS per label, cap."""
    probs = raw.token_probs
    phrase_scores = torch.stack([probs[:, list(idx)].max(dim=1).values for idx in caption.phrase_tokens], dim=1)
    best_score, best_phrase = phrase_scores.max(dim=1)
    keep = (best_score > box_threshold) & (best_score > text_threshold)
    if not keep.any():
        return []
    height, width = image_size
    unclipped = box_convert(raw.boxes_cxcywh[keep], "cxcywh", "xyxy") * torch.tensor([width, height, width, height])
    boxes = clip_boxes_to_image(unclipped, (height, width))
    scores, labels = best_score[keep], best_phrase[keep]
    kept_queries = keep.nonzero().flatten()
    order = batched_nms(boxes, scores, labels, nms_iou)[:max_detections]  # sorted by score, descending
    phrase_token_set = {i for idx in caption.phrase_tokens for i in idx}
    detections = []
    for i in order.tolist():
        query = kept_queries[i]
        detections.append(Detection(
            label=caption.phrases[int(labels[i])],
            box=_box(boxes[i]),
            score=float(scores[i]),
            phrase_scores={p: float(phrase_scores[query, j]) for j, p in enumerate(caption.phrases)},
            token_scores=tuple((caption.tokens[t], float(probs[query, t])) for t in sorted(phrase_token_set)),
            sam_box=_box(unclipped[i]),
        ))
    return detections


def _box(values: torch.Tensor) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in values)
    return x0, y0, x1, y1
