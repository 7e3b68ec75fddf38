"""A Label Studio labeling config, reduced to what the backend needs: which images to segment,
which labels to fill in, and how a detected phrase maps to a label.

Parsing is label-studio-sdk's ``LabelInterface``; the result is cached per config string (Label
Studio sends the full config with every request).

A ``<Label value="Animal" alias="ani"/>`` is *shown* as "Animal" but Label Studio stores "ani" in
results (its frontend writes ``alias || value``; label-studio-sdk's ``control.labels`` lists "ani"):
Grounding DINO is prompted with the value, results carry the alias, and typed prompts may use either.

Phrase -> label mapping (case-insensitive after an exact match, and blind to Unicode normalisation:
NFC or NFD "café", full-width "ｃａｔ", "ß"/"ss" compare as ``fold`` makes them), first rule that matches wins:
  1. the label's own name (its value, or its alias when it has one);
  2. one of the label's ``predicted_values`` aliases (``<Label value="Vehicle" predicted_values="car, truck"/>``);
  3. the same after dropping a leading article and a plural ending ("a cat", "cats" -> "cat");
  4. exactly one label (or alias) appears as whole words inside the phrase ("red car" -> "car").
A phrase no control on the image matches goes to the config's only BrushLabels label when there is
exactly one (a one-label project wants every typed phrase); otherwise it is skipped (and logged by
the caller). A control without the matched label (a RectangleLabels with fewer labels) skips it.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

BRUSH, RECTANGLE, POLYGON = "brushlabels", "rectanglelabels", "polygonlabels"
_CONTROL_KINDS = {"BrushLabels": BRUSH, "RectangleLabels": RECTANGLE, "PolygonLabels": POLYGON}
_ARTICLES = ("a ", "an ", "the ")
_WORD = re.compile(r"[\w'-]+", re.UNICODE)


class LabelConfigError(ValueError):
    """The labeling config can't be used by this backend (invalid XML, no BrushLabels, no labels)."""


class TaskDataError(ValueError):
    """A task's data lacks what the config needs (e.g. the field its <Image> reads)."""


def fold(text: str) -> str:
    """``text`` as phrases are compared: single spaces, case folded, NFKC ("Cafe\u0301" -> "café",
    "ｃａｔ" -> "cat", "Straße" -> "strasse"), so the same word typed or stored either way is the same."""
    return " ".join(unicodedata.normalize("NFKC", text.casefold()).split())


def _singular(word: str) -> str:
    if len(word) > 3 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith(("ses", "xes", "ches", "shes", "zes")):
        return word[:-2]
    if len(word) > 2 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def normalise_phrase(phrase: str) -> str:
    """Folded (``fold``), no leading article, last word singular: "The Red Cars" -> "red car"."""
    text = fold(phrase)
    for article in _ARTICLES:
        if text.startswith(article):
            text = text[len(article):]
            break
    words = text.split(" ")
    words[-1] = _singular(words[-1])
    return " ".join(words)


def _words(text: str) -> list[str]:
    return [_singular(w) for w in _WORD.findall(fold(text))]


def _contains(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return n > 0 and any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


@dataclass(frozen=True)
class LabelControl:
    """One ``<BrushLabels>``/``<RectangleLabels>``/``<PolygonLabels>`` on an image."""

    name: str  # from_name
    kind: str  # BRUSH, RECTANGLE or POLYGON: the result "type"
    to_name: str  # the Image tag's name
    labels: tuple[str, ...]  # as Label Studio stores them in results: each Label's alias, else its value
    aliases: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (label, predicted_values) pairs
    values: tuple[tuple[str, str], ...] = ()  # (label, visible value) pairs of Labels with an alias

    def alias_map(self) -> dict[str, tuple[str, ...]]:
        return dict(self.aliases)

    def value_of(self, label: str) -> str:
        """The name a person sees for ``label`` (its ``value``; ``label`` itself may be an alias)."""
        return dict(self.values).get(label, label)

    def prompt_phrases(self) -> list[str]:
        """What Grounding DINO is asked for: each label's predicted_values if it has any, else its value."""
        aliases = self.alias_map()
        phrases: list[str] = []
        for label in self.labels:
            phrases.extend(aliases.get(label) or (self.value_of(label),))
        return phrases

    def label_for(self, phrase: str) -> str | None:
        """The label (as results store it) a detected or typed phrase stands for; None when none."""
        names = self.aliases + tuple((label, (value,)) for label, value in self.values)
        return _match_label(phrase, self.labels, names)


@functools.lru_cache(maxsize=4096)
def _match_label(phrase: str, labels: tuple[str, ...], aliases: tuple[tuple[str, tuple[str, ...]], ...]) -> str | None:
    """``aliases``: (label, other names) pairs: its visible value when it has an alias, predicted_values."""
    if phrase in labels:  # exactly a label: itself, even next to one differing only in case ("Cat", "cat")
        return phrase
    lowered = fold(phrase)
    candidates = [(label, label) for label in labels]
    candidates += [(alias, label) for label, names in aliases for alias in names]
    for text, label in candidates:  # rules 1 and 2: exact name, then alias (labels come first)
        if fold(text) == lowered:
            return label
    normalised = normalise_phrase(phrase)
    for text, label in candidates:  # rule 3: articles and plurals
        if normalise_phrase(text) == normalised:
            return label
    words = _words(phrase)  # rule 4: exactly one label named inside the phrase
    found = {label for text, label in candidates if _contains(words, _words(text))}
    if len(found) == 1:
        return found.pop()
    return None


@dataclass(frozen=True)
class ImageTarget:
    """An ``<Image>`` tag with the label controls that draw on it."""

    name: str
    value: str  # "$image" (task data key) or a literal URL
    controls: tuple[LabelControl, ...]  # brush controls first

    @property
    def brush(self) -> tuple[LabelControl, ...]:
        return tuple(c for c in self.controls if c.kind == BRUSH)

    @property
    def only_label(self) -> str | None:
        """The BrushLabels label when this image has exactly one; unmatched phrases go to it."""
        labels = {label for control in self.brush for label in control.labels}
        return labels.pop() if len(labels) == 1 else None

    def labels_for(self, phrase: str) -> dict[str, str]:
        """{control name: label} for a detected phrase; controls the phrase doesn't map to are absent."""
        found = {c.name: label for c in self.controls if (label := c.label_for(phrase)) is not None}
        if not found and self.only_label is not None:
            found = {c.name: label for c in self.controls if (label := c.label_for(self.only_label)) is not None}
        return found

    def image_url(self, data: Mapping[str, Any]) -> str:
        """The image URL of a task's ``data`` for this tag."""
        if not self.value.startswith("$"):
            return self.value
        key = self.value[1:]
        if not isinstance(data, Mapping) or key not in data:
            raise TaskDataError(f"task data has no {key!r} field (the <Image name={self.name!r} value={self.value!r}> "
                           "of the labeling config)")
        value = data[key]
        if not isinstance(value, str) or not value.strip():
            raise TaskDataError(f"task data field {key!r} is not an image URL")
        return value


@dataclass(frozen=True)
class LabelConfig:
    """What the backend uses from a labeling config."""

    targets: tuple[ImageTarget, ...]  # images with at least one BrushLabels
    textareas: tuple[str, ...]  # TextArea names (free-text prompts)
    numbers: tuple[str, ...]  # Number names (box_threshold / text_threshold controls)

    def describe_labels(self) -> str:
        """The BrushLabels labels as a person sees them, for messages: 'Animal' (alias 'ani'), 'Car'."""
        named: dict[str, None] = {}
        for target in self.targets:
            for control in target.brush:
                for label in control.labels:
                    value = control.value_of(label)
                    named[repr(value) if value == label else f"{value!r} (alias {label!r})"] = None
        return ", ".join(named)

    @property
    def brush_labels(self) -> list[str]:
        seen: dict[str, None] = {}
        for target in self.targets:
            for control in target.brush:
                seen.update(dict.fromkeys(control.labels))
        return list(seen)

    def names(self) -> list[str]:
        """Every name a phrase may use for a label of any control: values, aliases, predicted_values."""
        seen: dict[str, None] = {}
        for target in self.targets:
            for control in target.controls:
                seen.update(dict.fromkeys(control.labels))
                seen.update(dict.fromkeys(value for _, value in control.values))
                seen.update(dict.fromkeys(name for _, names in control.aliases for name in names))
        return list(seen)

    def default_phrases(self) -> list[str]:
        """The prompt when nobody typed one: every BrushLabels label (its aliases where given)."""
        phrases: dict[str, str] = {}
        for target in self.targets:
            for control in target.brush:
                for phrase in control.prompt_phrases():
                    phrases.setdefault(phrase.lower(), phrase)
        return list(phrases.values())


def _split_values(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


# The tags and attributes this backend reads, as label-studio-sdk spells them. Label Studio's editor
# lower-cases every tag and attribute name it reads (``<brushlabels toname="image">`` works there); the
# SDK matches them exactly, so a config is given to it in these spellings.
_CANONICAL_TAGS = {tag.lower(): tag for tag in (
    "View", "Image", "BrushLabels", "RectangleLabels", "PolygonLabels", "Label", "TextArea", "Number")}
_CANONICAL_ATTRIBUTES = {"toname": "toName", "predicted_values": "predicted_values"}


def _canonical_case(config: str) -> str:
    """``config`` with the tags and attributes of ``_CANONICAL_TAGS``/``_CANONICAL_ATTRIBUTES`` spelled
    as the SDK expects; the text itself when they already are, or when it isn't XML (the SDK says why).
    LabelConfigError for a config that declares a DOCTYPE."""
    from lxml import etree  # type: ignore[import-untyped]  # label-studio-sdk parses with it too

    try:
        # Nothing loaded or expanded: this pass only renames; the SDK's own parse decides the rest.
        root = etree.fromstring(config, etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False))
    except (etree.XMLSyntaxError, ValueError):
        return config
    if root.getroottree().docinfo.doctype:
        # Label Studio parses configs with DTDs forbidden; its entities would reach only this backend.
        raise LabelConfigError("label config is not valid: it declares a <!DOCTYPE>, which Label Studio refuses")
    changed = False
    for element in root.iter(tag=etree.Element):
        tag = _CANONICAL_TAGS.get(str(element.tag).lower(), element.tag)
        keys = [k for k in element.attrib if str(k).lower() in _CANONICAL_ATTRIBUTES
                and k != _CANONICAL_ATTRIBUTES[str(k).lower()]]
        changed = changed or tag != element.tag or bool(keys)
        element.tag = tag
        for key in keys:
            element.attrib[_CANONICAL_ATTRIBUTES[str(key).lower()]] = element.attrib.pop(key)
    return etree.tostring(root, encoding="unicode") if changed else config


@functools.lru_cache(maxsize=64)
def parse_label_config(config: str) -> LabelConfig:
    """Parse a labeling config; raises ``LabelConfigError`` naming what is wrong."""
    if not isinstance(config, str) or not config.strip():
        raise LabelConfigError("label config is empty")
    from label_studio_sdk.label_interface import LabelInterface

    canonical = _canonical_case(config)
    try:
        interface = LabelInterface(canonical)
    except Exception as exc:  # lxml syntax errors and the SDK's own validation errors
        raise LabelConfigError(f"label config is not valid XML: {exc}") from exc
    objects = {o.name: o for o in (interface.objects or [])}
    controls = list(interface.controls or [])
    images = {name: o for name, o in objects.items() if o.tag.lower() == "image"}

    by_image: dict[str, list[LabelControl]] = {}
    for control in controls:
        kind = _CONTROL_KINDS.get(control.tag)
        if kind is None:
            continue
        for to_name in control.to_name:
            if to_name not in images:
                if kind == BRUSH:
                    raise LabelConfigError(
                        f"<BrushLabels name={control.name!r}> must point at an <Image> (toName={to_name!r} is not one)")
                continue
            labels = tuple(control.labels)
            if not labels and kind == BRUSH:
                raise LabelConfigError(f"<BrushLabels name={control.name!r}> has no <Label value=...> children")
            # labels_attrs is keyed like control.labels: by alias where a Label has one, else by value.
            attrs = {label: dict(tag.attr) for label, tag in (control.labels_attrs or {}).items()}
            aliases = tuple(
                (label, _split_values(attr["predicted_values"]))
                for label, attr in attrs.items() if _split_values(attr.get("predicted_values") or "")
            )
            values = tuple((label, attr["value"]) for label, attr in attrs.items()
                           if attr.get("value") and attr["value"] != label)
            label_control = LabelControl(control.name, kind, to_name, labels, aliases, values)
            if kind == BRUSH and not any(phrase.strip() for phrase in label_control.prompt_phrases()):
                raise LabelConfigError(f"every <Label> of <BrushLabels name={control.name!r}> has a blank value: "
                                       "give each the name of what to segment")
            by_image.setdefault(to_name, []).append(label_control)

    targets = []
    for name, image_controls in by_image.items():
        if any(c.kind == BRUSH for c in image_controls):
            ordered = sorted(image_controls, key=lambda c: c.kind != BRUSH)
            targets.append(ImageTarget(name=name, value=images[name].value or "", controls=tuple(ordered)))
    if not targets:
        raise LabelConfigError(
            "label config has no <BrushLabels> connected to an <Image>: this backend predicts brush masks, add "
            '<BrushLabels name="tag" toName="image"><Label value="..."/></BrushLabels>'
        )
    textareas = tuple(c.name for c in controls if c.tag == "TextArea")
    numbers = tuple(c.name for c in controls if c.tag == "Number")
    return LabelConfig(targets=tuple(targets), textareas=textareas, numbers=numbers)
