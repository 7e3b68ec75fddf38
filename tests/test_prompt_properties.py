"""Property tests (hypothesis) for prompt parsing, caption token spans and label-config parsing: any
text a person types or puts in a config either gives a clear error or a well-formed result."""

from __future__ import annotations

from xml.sax.saxutils import quoteattr

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from backend.detector import Caption, PromptError, parse_prompt
from backend.label_config import LabelConfigError, parse_label_config
from backend.prompts import split_typed_prompt

# Letters, marks, digits, punctuation, symbols (emoji), spaces and separators of every script, with
# the characters whose case mapping changes the length or the token split drawn often (İ lower-cases
# to two characters, ß upper-cases to two, ǅ is title case, ﬁ is a ligature).
TRICKY = "İıßẞǅΣς\u0301\u0307ﬁ🐱👍🏽猫黒"
UNICODE = st.characters(codec="utf-8", categories=("L", "M", "N", "P", "S", "Z", "Cc"))
WORDS = st.one_of(st.text(UNICODE, max_size=40), st.text(st.sampled_from(TRICKY + "catdog .,"), max_size=20))
QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_well_formed(phrases: list[str]) -> None:
    assert phrases
    for phrase in phrases:
        assert phrase and phrase == " ".join(phrase.split())  # non-empty, stripped, single spaces
    assert len({p.lower() for p in phrases}) == len(phrases)  # deduplicated case-insensitively


@QUICK
@given(st.one_of(WORDS, st.lists(WORDS, max_size=6)))
def test_split_typed_prompt_gives_phrases_or_a_prompt_error(text):
    try:
        phrases = split_typed_prompt(text)
    except PromptError as exc:
        assert "empty" in str(exc)
        return
    assert_well_formed(phrases)
    assert not any(sep in p for p in phrases for sep in ".,;\n\r")
    assert split_typed_prompt(phrases) == phrases  # parsing its own output changes nothing


@QUICK
@given(st.one_of(WORDS, st.lists(WORDS, max_size=6)))
def test_parse_prompt_gives_phrases_or_a_prompt_error(prompt):
    try:
        phrases = parse_prompt(prompt)
    except PromptError:
        return
    assert_well_formed(phrases)
    assert parse_prompt(phrases) == phrases


@pytest.fixture(scope="module")
def tokenizer(tiny_cache):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_cache / "tiny-bert"))


@QUICK
@given(phrases=st.lists(WORDS, min_size=1, max_size=6))
def test_caption_spans_give_each_known_phrase_its_own_tokens(tokenizer, phrases):
    try:
        phrases = parse_prompt(phrases)
    except PromptError:
        return
    # A phrase's tokens are its own, less Grounding DINO's phrase separators ('.', '?' end a phrase:
    # inside one they are read as spaces).
    alone = [[t for t in tokenizer.tokenize(p.lower()) if t not in (".", "?")] for p in phrases]
    assume(all(alone))  # phrases the tokenizer knows (not only marks, separators or control characters)
    try:
        caption = Caption.build(phrases, tokenizer)
    except PromptError as exc:
        assert "too long" in str(exc)
        return
    for phrase, indices, tokens in zip(phrases, caption.phrase_tokens, alone, strict=True):
        assert indices, phrase
        assert [caption.tokens[i] for i in indices] == tokens, phrase


LABEL = st.text(UNICODE, min_size=1, max_size=20)


def config_xml(values: list[str], aliases: list[str | None]) -> str:
    labels = "".join(f"<Label value={quoteattr(v)}" + (f" alias={quoteattr(a)}" if a else "") + "/>"
                     for v, a in zip(values, aliases, strict=True))
    return (f'<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">{labels}'
            "</BrushLabels></View>")


@QUICK
@given(st.lists(st.tuples(LABEL, st.one_of(st.none(), LABEL)), min_size=1, max_size=6,
                unique_by=lambda pair: pair[1] or pair[0]))
def test_label_config_maps_every_label_to_itself_or_says_why_not(pairs):
    values = [v for v, _ in pairs]
    aliases = [a for _, a in pairs]
    try:
        config = parse_label_config(config_xml(values, aliases))
    except LabelConfigError as exc:
        assert str(exc)
        return
    control = config.targets[0].brush[0]
    for label in control.labels:
        assert control.label_for(label) == label  # what results store maps to itself, every time
        assert control.label_for(label) == label
    for value, alias in pairs:
        stored = alias or value
        if stored in control.labels:
            assert control.value_of(stored) == value
    # The default prompt is never empty, and each of its phrases maps back to a label.
    phrases = parse_prompt(config.default_phrases())
    for phrase in phrases:
        assert config.targets[0].labels_for(phrase), phrase
