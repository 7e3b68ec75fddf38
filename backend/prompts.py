"""Which prompt and thresholds a prediction runs with.

Where the prompt comes from, first that applies:
  1. interactive mode: the text of every ``textarea`` result in ``params.context``;
  2. the last prompt this project used (from a context, or a TextArea in an annotation webhook),
     so the prompt a user typed carries over to the next image;
  3. ``prompt`` in the project's ``extra_params`` (sent by Label Studio with /setup);
  4. the PROMPT environment variable;
  5. the config's BrushLabels labels (their ``predicted_values`` aliases where given).
Thresholds: a ``<Number name="box_threshold">``/``"text_threshold"`` value in the context, then the
project's remembered ones, then ``extra_params``, then the engine's (BOX_THRESHOLD/TEXT_THRESHOLD).
Typed prompts are split on '.', ',', ';' and new lines ("cat, dog" -> ["cat", "dog"]); a label name that
has one of them ("St. Bernard") is put back together when typed whole (``rejoin_label_names``). /predict leaves
out the phrases that map to no label before detection (``check_prompt_labels``) and names them in the
response's ``dropped_phrases``; a prompt with no phrase that maps is a 400. So are phrases the text
encoder has no token for ("...", a lone accent: ``check_prompt_tokens``), and a phrase longer than one
detector pass reads is a 400 naming the limit, before any task runs.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .detector import MAX_TEXT_TOKENS, PromptError, parse_prompt, readable_phrases
from .errors import BadRequest
from .label_config import LabelConfig, fold

logger = logging.getLogger(__name__)

THRESHOLD_NAMES = ("box_threshold", "text_threshold")
_PROMPT_SEPARATORS = re.compile(r"[.,;\n\r]+")


def split_typed_prompt(text: str | Sequence[str]) -> list[str]:
    """Phrases of a prompt a person typed: "cat, dog. red car" -> ["cat", "dog", "red car"]."""
    texts = [text] if isinstance(text, str) else [str(t) for t in text]
    return parse_prompt([p for t in texts for p in _PROMPT_SEPARATORS.split(t)])


def parse_threshold(value: Any, name: str) -> float:
    """A threshold from JSON or a form field; BadRequest unless it is a number within [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRequest(f"{name} must be a number within [0, 1], got {value!r}")
    try:
        number = float(value)
    except ValueError as exc:
        raise BadRequest(f"{name} must be a number within [0, 1], got {value!r}") from exc
    if not (0.0 <= number <= 1.0) or math.isnan(number):
        raise BadRequest(f"{name} must be within [0, 1], got {number}")
    return number


@dataclass(frozen=True)
class PromptInput:
    """Prompt and thresholds found in one place (a context, an annotation, extra_params)."""

    phrases: tuple[str, ...] | None = None
    box_threshold: float | None = None
    text_threshold: float | None = None

    @property
    def empty(self) -> bool:
        return self.phrases is None and self.box_threshold is None and self.text_threshold is None


def read_results(results: Any, where: str = "context.result") -> PromptInput:
    """Prompt (every ``textarea`` result's text) and thresholds (``number`` results named
    box_threshold / text_threshold) from a context's or annotation's ``result`` list.

    Arguments:
        results: the ``result`` list (None: nothing given).
        where: how errors name the list ("context.result", "annotation.result").
    Returns:
        A ``PromptInput``; BadRequest names the field when a result has the wrong shape.
    """
    if results is None:
        return PromptInput()
    if not isinstance(results, list):
        raise BadRequest(f"{where} must be a list of results, got {type(results).__name__}")
    texts: list[str] = []
    thresholds: dict[str, float] = {}
    for i, item in enumerate(results):
        if not isinstance(item, Mapping):
            continue
        kind = str(item.get("type", "")).lower()
        value = item.get("value")
        if not isinstance(value, Mapping):
            value = {}
        if kind == "textarea":
            text = value.get("text") or []
            text = [text] if isinstance(text, str) else text
            if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
                raise BadRequest(f"{where}[{i}].value.text must be a string or a list of strings, got "
                                 f"{value.get('text')!r:.80}")
            texts.extend(text)
        elif kind == "number" and str(item.get("from_name", "")).lower() in THRESHOLD_NAMES and "number" in value:
            name = str(item["from_name"]).lower()
            thresholds[name] = parse_threshold(value["number"], name)
    phrases = None
    if texts:
        try:
            phrases = tuple(split_typed_prompt(texts))
        except PromptError as exc:
            raise PromptError(f"the TextArea prompt is empty: type what to segment, e.g. 'cat, dog' ({exc})") from exc
    return PromptInput(phrases, thresholds.get("box_threshold"), thresholds.get("text_threshold"))


def read_context(context: Any) -> PromptInput:
    """What an interactive request's ``params.context`` asks for."""
    if context is None:
        return PromptInput()
    if not isinstance(context, Mapping):
        raise BadRequest("params.context must be a JSON object or null")
    return read_results(context.get("result"))


def read_extra_params(extra: Any) -> PromptInput:
    """``prompt``, ``box_threshold``, ``text_threshold`` from a project's ``extra_params``."""
    if extra in (None, "", {}):
        return PromptInput()
    if isinstance(extra, str):
        import json

        try:
            extra = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"extra_params must be a JSON object: {exc}") from exc
    if not isinstance(extra, Mapping):
        raise BadRequest("extra_params must be a JSON object")
    unknown = sorted(set(extra) - {"prompt", *THRESHOLD_NAMES})
    if unknown:
        logger.info("ignoring unknown extra_params %s (known: prompt, box_threshold, text_threshold)", unknown)
    phrases = None
    if extra.get("prompt") not in (None, ""):
        prompt = extra["prompt"]
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list)
                                                   and not all(isinstance(p, str) for p in prompt)):
            raise BadRequest("extra_params.prompt must be a string like 'cat . dog' or a list of phrases")
        phrases = tuple(split_typed_prompt(prompt))
    return PromptInput(
        phrases,
        parse_threshold(extra["box_threshold"], "box_threshold") if extra.get("box_threshold") is not None else None,
        parse_threshold(extra["text_threshold"], "text_threshold") if extra.get("text_threshold") is not None else None,
    )


@dataclass(frozen=True)
class PromptPlan:
    """The prompt and thresholds one /predict request runs with."""

    phrases: tuple[str, ...]
    source: str  # context | project | extra_params | env | labels
    box_threshold: float | None = None
    text_threshold: float | None = None
    # Typed phrases no label matches, left out before detection: their boxes would take the
    # detection cap and then be dropped, leaving nothing for the phrases that do match.
    dropped: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The plan as a background job stores it."""
        return {"phrases": list(self.phrases), "source": self.source, "box_threshold": self.box_threshold,
                "text_threshold": self.text_threshold, "dropped": list(self.dropped)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PromptPlan:
        """The plan ``to_json`` stored (a job's)."""
        return cls(tuple(str(p) for p in data["phrases"]), str(data.get("source") or "job"),
                   data.get("box_threshold"), data.get("text_threshold"),
                   tuple(str(p) for p in data.get("dropped") or ()))


def plan_prompt(config: LabelConfig, context: PromptInput, remembered: PromptInput = PromptInput(),
                extra: PromptInput = PromptInput(), env_prompt: Sequence[str] | None = None) -> PromptPlan:
    """Pick the prompt and thresholds by the precedence in the module docstring."""
    sources = (("context", context), ("project", remembered), ("extra_params", extra))
    phrases, source = None, "labels"
    for name, given in sources:
        if given.phrases:
            phrases, source = given.phrases, name
            break
    if phrases is None and env_prompt:
        phrases, source = tuple(env_prompt), "env"
    if phrases is None:
        phrases = tuple(config.default_phrases())

    def first(attr: str) -> float | None:
        return next((getattr(g, attr) for _, g in sources if getattr(g, attr) is not None), None)

    return PromptPlan(phrases, source, first("box_threshold"), first("text_threshold"))


def rejoin_label_names(config: LabelConfig, phrases: Sequence[str]) -> tuple[str, ...]:
    """``phrases`` with the label names that splitting on separators cut put back together: a person
    typing the label "St. Bernard" (or "cat, big") means that label, not "St" and "Bernard". Runs of
    phrases that are exactly a name's pieces (``fold``-equal) become the name as the config writes it,
    longest name first."""
    pieces: dict[tuple[str, ...], str] = {}
    for name in config.names():
        parts = tuple(fold(part) for part in _PROMPT_SEPARATORS.split(name) if part.strip())
        if len(parts) > 1:
            pieces.setdefault(parts, name)
    if not pieces:
        return tuple(phrases)
    longest = max(len(parts) for parts in pieces)
    folded = [fold(phrase) for phrase in phrases]
    out: list[str] = []
    i = 0
    while i < len(phrases):
        for k in range(min(longest, len(phrases) - i), 1, -1):
            joined = pieces.get(tuple(folded[i:i + k]))
            if joined is not None:
                out.append(joined)
                i += k
                break
        else:
            out.append(phrases[i])
            i += 1
    return tuple(out)


def _maps_to_label(config: LabelConfig, phrase: str) -> bool:
    return any(target.labels_for(phrase) for target in config.targets)


def maps_to_labels(config: LabelConfig, phrases: Sequence[str]) -> bool:
    return any(_maps_to_label(config, phrase) for phrase in rejoin_label_names(config, phrases))


def check_prompt_labels(config: LabelConfig, plan: PromptPlan) -> PromptPlan:
    """The plan with cut label names rejoined (``rejoin_label_names``) and without the phrases that map
    to no label (named in ``dropped``), so the detection cap goes to phrases whose masks are kept;
    BadRequest when no phrase maps to a label.

    In a config with a single BrushLabels label every phrase maps (to that label): nothing is dropped.
    """
    phrases = rejoin_label_names(config, plan.phrases)
    if phrases != plan.phrases:
        plan = replace(plan, phrases=phrases)
    kept = tuple(phrase for phrase in plan.phrases if _maps_to_label(config, phrase))
    if kept:
        dropped = tuple(phrase for phrase in plan.phrases if phrase not in kept)
        return replace(plan, phrases=kept, dropped=plan.dropped + dropped) if dropped else plan
    raise BadRequest(
        f"unknown labels: the prompt {list(plan.phrases)} (from {plan.source}) matches none of the BrushLabels "
        f"labels ({config.describe_labels()}); use label names, or list synonyms in a label's predicted_values")


def check_prompt_tokens(plan: PromptPlan, tokenizer: Any, max_tokens: int = MAX_TEXT_TOKENS) -> PromptPlan:
    """The plan without the phrases the text encoder has no token for (named in ``dropped``): a label
    like "..." must not fail every task of a batch. PromptError (a 400) naming the limit when one
    phrase alone is longer than a detector pass reads, or when no phrase is left."""
    try:
        kept, unreadable = readable_phrases(plan.phrases, tokenizer, max_tokens)
    except PromptError as exc:
        raise PromptError(f"{exc} (the prompt from {plan.source})") from exc
    if not kept:
        raise PromptError(f"the prompt {list(plan.phrases)} (from {plan.source}) has no word the text encoder can "
                          "read: name what to segment in letters or digits")
    if not unreadable:
        return plan
    return replace(plan, phrases=tuple(kept), dropped=plan.dropped + tuple(unreadable))
