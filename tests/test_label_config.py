"""backend.label_config: Label aliases, what Grounding DINO is prompted with, and what results store."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.label_config import LabelConfigError, parse_label_config
from backend.ls_results import segments_to_results
from backend.prompts import PromptPlan, check_prompt_labels, maps_to_labels, split_typed_prompt
from backend.types import Segment

ALIASED = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Animal" alias="ani"/>
    <Label value="Vehicle" alias="veh" predicted_values="car, truck"/>
    <Label value="Tree"/>
  </BrushLabels>
  <RectangleLabels name="box" toName="image">
    <Label value="Animal" alias="ani"/>
  </RectangleLabels>
</View>
"""


def test_aliased_labels_are_stored_by_alias_and_prompted_by_value():
    config = parse_label_config(ALIASED)
    brush_control = config.targets[0].brush[0]
    # label-studio-sdk 2.1.2's control.labels (and Label Studio's results) use the alias.
    assert brush_control.labels == ("ani", "veh", "Tree")
    assert LabelInterface(ALIASED).get_control("mask").labels == ["ani", "veh", "Tree"]
    assert config.default_phrases() == ["Animal", "car", "truck", "Tree"]  # what a person sees, or predicted_values
    assert config.describe_labels() == "'Animal' (alias 'ani'), 'Vehicle' (alias 'veh'), 'Tree'"


@pytest.mark.parametrize("phrase, label", [
    ("Animal", "ani"), ("animals", "ani"), ("ani", "ani"), ("ANI", "ani"), ("a big animal", "ani"),
    ("Vehicle", "veh"), ("veh", "veh"), ("trucks", "veh"), ("Tree", "Tree"), ("zebra", None),
])
def test_value_alias_and_predicted_values_all_name_the_label(phrase, label):
    assert parse_label_config(ALIASED).targets[0].brush[0].label_for(phrase) == label


def test_aliased_result_passes_label_studio_validation():
    target = parse_label_config(ALIASED).targets[0]
    mask = np.zeros((20, 30), bool)
    mask[5:15, 5:20] = True
    segment = Segment(label="Animal", box=(5.0, 5.0, 20.0, 15.0), score=0.7, predicted_iou=0.9, mask=mask)
    results, _ = segments_to_results([segment], target, 30, 20)
    assert [(r["from_name"], r["value"].get("brushlabels") or r["value"].get("rectanglelabels")) for r in results] == [
        ("mask", ["ani"]), ("box", ["ani"])]
    assert LabelInterface(ALIASED).validate_prediction({"result": results}, return_errors=True) == []


def test_labels_differing_only_in_case_map_to_themselves():
    config = parse_label_config('<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i">'
                                '<Label value="Cat"/><Label value="cat"/></BrushLabels></View>')
    control = config.targets[0].brush[0]
    assert (control.label_for("Cat"), control.label_for("cat")) == ("Cat", "cat")


@pytest.mark.parametrize("labels", ['<Label value=" "/>', '<Label value=" "/><Label value="&#10;"/>'])
def test_brush_labels_with_only_blank_values_are_refused(labels):
    with pytest.raises(LabelConfigError, match="blank"):
        parse_label_config(f'<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i">{labels}'
                           '</BrushLabels></View>')


@pytest.mark.parametrize("label, typed", [
    ("cafe\u0301", "caf\u00e9"), ("caf\u00e9", "cafe\u0301"),  # NFD label typed NFC, and the other way
    ("ｃａｔ", "cat"), ("Straße", "STRASSE"), ("İstanbul", "i\u0307stanbul"),  # full width, case folding
    ("e\u0301clair", "a big \u00e9clair"),  # rule 4 (a label inside the phrase) sees the same words
])
def test_typed_phrase_matches_a_label_written_in_another_unicode_form(label, typed):
    config = parse_label_config('<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i">'
                                f'<Label value="{label}"/><Label value="dog"/></BrushLabels></View>')
    control = config.targets[0].brush[0]
    assert control.label_for(typed) == label  # stored exactly as the config writes it


SEPARATED = ('<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i"><Label value="St. Bernard"/>'
             '<Label value="cat, big"/><Label value="Dog" predicted_values="a.b.c, pug"/><Label value="St"/>'
             '</BrushLabels></View>')


@pytest.mark.parametrize("typed, phrases, dropped", [
    ("St. Bernard, zebra", ("St. Bernard",), ("zebra",)),
    ("st . bernard;cat,big", ("St. Bernard", "cat, big"), ()),
    ("A.B.C, pug, St", ("a.b.c", "pug", "St"), ()),  # a predicted value; "St" alone is its own label
    ("St, cat", ("St",), ("cat",)),  # only the whole name rejoins
])
def test_typed_label_name_with_a_separator_is_put_back_together(typed, phrases, dropped):
    config = parse_label_config(SEPARATED)
    plan = check_prompt_labels(config, PromptPlan(tuple(split_typed_prompt(typed)), "context"))
    assert (plan.phrases, plan.dropped) == (phrases, dropped)
    assert maps_to_labels(config, split_typed_prompt("St. Bernard"))


@pytest.mark.parametrize("config", [
    '<View><Image name="image" value="$image"/><brushlabels name="mask" toname="image"><label value="Cat"/>'
    "</brushlabels></View>",
    '<view><IMAGE name="image" value="$image"/><BrushLabels name="mask" TONAME="image">'
    '<Label value="Cat" alias="c"/></BrushLabels><rectanglelabels name="box" toName="image">'
    '<label value="Cat" alias="c"/></rectanglelabels></view>',
])
def test_tag_and_attribute_names_in_any_case_are_read(config):
    # Label Studio's editor lower-cases tag and attribute names (it accepts these configs); the SDK doesn't.
    target = parse_label_config(config).targets[0]
    assert (target.name, target.value, target.brush[0].name) == ("image", "$image", "mask")
    mask = np.zeros((20, 30), bool)
    mask[5:15, 5:20] = True
    segment = Segment(label="cat", box=(5.0, 5.0, 20.0, 15.0), score=0.7, predicted_iou=0.9, mask=mask)
    results, _ = segments_to_results([segment], target, 30, 20)
    labels = {r["type"]: r["value"][r["type"]] for r in results}
    assert labels["brushlabels"] in (["Cat"], ["c"]) and all(v == labels["brushlabels"] for v in labels.values())


@pytest.mark.parametrize("doctype", [
    '<!DOCTYPE View [<!ENTITY a "cat">]>',
    '<!DOCTYPE View [<!ENTITY a "x"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>',
    '<!DOCTYPE View SYSTEM "file:///etc/hostname">',
])
@pytest.mark.parametrize("tags", ["View", "view"])  # spelled as the SDK reads it, and as it is renamed
def test_a_doctype_is_refused_as_label_studio_refuses_it(doctype, tags):
    config = (f'{doctype}<{tags}><Image name="image" value="$image"/><BrushLabels name="m" toName="image">'
              f'<Label value="dog"/></BrushLabels></{tags}>')
    with pytest.raises(LabelConfigError, match="DOCTYPE"):
        parse_label_config(config)
