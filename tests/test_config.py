"""Settings: validation messages, and the infotext / API / positional forms round-tripping."""
from dataclasses import fields

import pytest

from omg_ext.config import (ARGS_COUNT, concept_loras_in_prompt, CONCEPT_FIELDS, FIELDS, MAX_CONCEPTS, XYZ_AXES, ConceptSpec, OmgConfig,
                            OmgConfigError, compact, from_args, from_dict, from_infotext, to_args,
                            to_dict, to_infotext, top_tags, prefill_prompt, with_overrides)

PROMPT = "a man and a woman hugging on a beach, <lora:beach:0.5>"


def _cfg(**kw):
    concepts = [ConceptSpec(lora="hero", lora_hash="abc123", unet_weight=0.8, class_word="man",
                            prompt='a man, "hero", red cape: detailed'),
                ConceptSpec(lora="heroine", te_weight=0.5, class_word="woman", prompt="a woman, blue dress",
                            negative_prompt="blurry, lowres")]
    return OmgConfig(enabled=True, blend_start=0.32, concepts=concepts, **kw)


def test_the_tables_declare_every_setting_in_order():
    assert [f.name for f in fields(OmgConfig) if f.name != "concepts"] == [f.attr for f in FIELDS]
    assert [f.name for f in fields(ConceptSpec)] == [f.attr for f in CONCEPT_FIELDS]
    assert ARGS_COUNT == len(FIELDS) + MAX_CONCEPTS * len(CONCEPT_FIELDS) == 18 + 5 * 8


def test_defaults():
    cfg = OmgConfig()
    assert (cfg.enabled, cfg.blend_start, cfg.mask_source, cfg.layout_preservation) == (False, 0.35, "attention", True)
    assert (cfg.concept_guidance, cfg.background, cfg.mask_split) == ("shared", "pass 1", "figures")
    assert (cfg.show_masks, cfg.show_layout) == (True, False)  # the masks over the image; the layout costs a VAE decode
    assert cfg.validate() is cfg  # disabled: concepts not required


@pytest.mark.parametrize("change,field,message", [
    (dict(blend_start=1.5), "blend_start", r"OMG blend start must be between 0 and 1 \(got 1.5\)"),
    (dict(self_attention_until=-0.1), "self_attention_until", "self attention until must be between 0 and 1"),
    (dict(mask_source="sam"), "mask_source", "mask source must be one of attention"),
    (dict(mask_dilation=300), "mask_dilation", "mask dilation must be 0 to 256 pixels"),
    (dict(mode="quick"), "mode", "mode must be one of two passes, one pass, fast"),
    (dict(mode="one pass", blend_start=0.0), "blend_start",
     "one pass mode makes attention masks from the steps before the blend start"),
    (dict(mode="fast", blend_start=0.0), "blend_start", "fast mode makes attention masks from the steps before the blend start"),
    (dict(mode="fast", blend_start=0.0, mask_source="detector+sam"), "blend_start",
     r"fast mode makes detector\+sam masks from the steps before the blend start: the blend start must be above 0"),
    (dict(concepts=[]), "concepts", "OMG needs at least one concept"),
    (dict(concepts=[ConceptSpec(class_word="man", prompt="x")] * 6), "concepts", "at most 5 concepts"),
])
def test_bad_settings_are_named(change, field, message):
    cfg = _cfg()
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(OmgConfigError, match=message) as e:
        cfg.validate()
    assert e.value.field == field


def test_five_concepts_are_supported():
    OmgConfig(enabled=True, concepts=[ConceptSpec(class_word="man", prompt="x")] * 5).validate()


def test_bad_concepts_are_named_with_their_number():
    cfg = _cfg()
    cfg.concepts[1].class_word = "dog"
    assert cfg.validate() is cfg  # not in the prompt: skipped by the adapter with a warning, not an error
    cfg.concepts[1] = ConceptSpec(class_word="woman", prompt=" ")
    with pytest.raises(OmgConfigError, match="OMG concept 2: the concept prompt is empty"):
        cfg.validate()
    cfg.concepts[1] = ConceptSpec(class_word="woman", prompt="p", unet_weight=9)
    with pytest.raises(OmgConfigError, match="OMG concept 2: unet weight must be within"):
        cfg.validate()


def test_a_concepts_own_controlnet_unit_is_checked_and_reaches_the_infotext_only_when_set():
    cfg = _cfg()
    assert "OMG c1 control unit" not in to_infotext(cfg)  # -1 (none), the default: left out
    cfg.concepts[1].control_unit = 2
    assert cfg.validate() is cfg and to_infotext(cfg)["OMG c2 control unit"] == 2
    assert from_infotext({k: str(v) for k, v in to_infotext(cfg).items()}).concepts[1].control_unit == 2
    cfg.concepts[0].control_unit = 2
    with pytest.raises(OmgConfigError, match=r"two concepts name the same ControlNet unit \(2, 2\)"):
        cfg.validate()
    cfg.concepts[0].control_unit = 10
    with pytest.raises(OmgConfigError, match="OMG concept 1: the ControlNet unit must be 0 to 9") as e:
        cfg.validate()
    assert e.value.field == "concepts[1].control_unit"
    for mode in ("fast", "one pass"):
        cfg.concepts[0].control_unit, cfg.mode = -1, mode
        with pytest.raises(OmgConfigError, match=f"{mode} mode: a ControlNet or IP-Adapter unit for one concept needs the two-pass mode"):
            cfg.validate()


def test_masks_are_split_by_figures_for_all_concepts_or_by_pixels_for_same_word_concepts_only():
    concepts = [ConceptSpec(class_word=w, prompt="p") for w in ("man", "woman", "Man ")]
    assert OmgConfig(concepts=concepts).mask_groups() == [[0, 1, 2]]  # the default: figures
    assert OmgConfig(mask_split="pixels", concepts=concepts).mask_groups() == [[0, 2]]
    assert OmgConfig(mask_split="pixels", concepts=concepts[:2]).mask_groups() == []
    assert OmgConfig(concepts=concepts[:1]).mask_groups() == []  # one concept: nothing to split


def test_infotext_round_trip_through_strings():
    cfg = _cfg(mask_feather=12, hires_blend=True)
    text = to_infotext(cfg)
    assert text["OMG"] is True and text["OMG c1 lora hash"] == "abc123" and "OMG c2 lora hash" not in text
    assert "OMG c1 negative" not in text and text["OMG c2 negative"] == "blurry, lowres"
    assert from_infotext({k: str(v) for k, v in text.items()}) == cfg
    assert to_infotext(OmgConfig()) == {}


def test_infotext_absent_or_malformed():
    assert from_infotext({"Steps": "20"}) is None
    with pytest.raises(OmgConfigError, match="OMG blend start must be a number, got 'fast'") as e:
        from_infotext({"OMG": "True", "OMG blend start": "fast"})
    assert e.value.field == "OMG blend start"
    partial = from_infotext({"OMG": "True", "OMG c1 class": "man", "OMG c1 prompt": "a man"})
    assert partial.blend_start == 0.35 and partial.concepts == [ConceptSpec(class_word="man", prompt="a man")]


def test_dict_round_trip_and_errors():
    cfg = _cfg()
    assert from_dict(to_dict(cfg)) == cfg
    with pytest.raises(OmgConfigError, match="unknown OMG setting 'blend'; valid settings: enabled, blend_start"):
        from_dict({"blend": 0.3})
    with pytest.raises(OmgConfigError, match="unknown OMG concept 1 setting 'weight'"):
        from_dict({"concepts": [{"weight": 1}]})
    with pytest.raises(OmgConfigError, match="blend_start must be a number, got 'abc'"):
        from_dict({"blend_start": "abc"})
    assert from_dict({"enabled": "true", "show_masks": 0}).enabled is True


def test_args_round_trip_with_unused_slots():
    cfg = _cfg()
    args = to_args(cfg)
    assert len(args) == ARGS_COUNT and args[0] is True
    assert from_args(args) == cfg
    assert from_args([to_dict(cfg)]) == cfg
    assert from_args([to_dict(cfg)] + to_args(OmgConfig())[1:]) == cfg  # the API pads the rest with UI defaults
    with pytest.raises(OmgConfigError, match=f"OMG expects {ARGS_COUNT} values .* got 3"):
        from_args([True, 0.3, "attention"])


def test_a_request_without_the_scripts_values_is_not_enabled():
    assert from_args([]) == OmgConfig()


def test_a_short_positional_request_padded_by_the_webui_says_what_the_positional_form_takes():
    padded = [True, 0.3] + to_args(OmgConfig())[2:]  # what the WebUI makes of "args": [true, 0.3]
    with pytest.raises(OmgConfigError, match="OMG needs at least one concept") as error:
        from_args(padded)
    message = str(error.value)
    assert f"all {ARGS_COUNT} positional values" in message and "the 18 settings (enabled, blend_start, mask_source" in message
    assert "5 concepts of 8 (lora, lora_hash, unet_weight, te_weight, class_word, prompt, negative_prompt, control_unit)" in message
    assert from_args(to_args(OmgConfig())) == OmgConfig()  # disabled without concepts: no error


def test_compact_summary():
    assert compact(_cfg()) == "OMG two passes s=0.32 attention 2 concepts: man<hero:0.8>, woman<heroine:1>"


def test_xyz_overrides_reach_the_config_and_missing_concepts_are_named():
    assert [label for label, _, _ in XYZ_AXES][:5] == ["[OMG] Blend start", "[OMG] Mask source", "[OMG] Mode",
                                                       "[OMG] Mask split", "[OMG] Concept 1 LoRA weight"]
    cfg = with_overrides(_cfg(), {"blend_start": 0.6, "concepts[1].unet_weight": 0.25, "mask_split": "pixels"})
    assert cfg.blend_start == 0.6 and cfg.concepts[1].unet_weight == 0.25 and cfg.concepts[0].unet_weight == 0.8
    assert cfg.mask_groups() == []
    with pytest.raises(OmgConfigError, match="OMG X/Y/Z: concept 4 is not set up"):
        with_overrides(_cfg(), {"concepts[3].unet_weight": 1.0})


def test_trigger_words_and_prompt_prefill():
    freq = {"10_hero": {"hero": 30, " red cape": 12, "smile": 12, "1boy": 3}, "5_extra": {"smile": 1}}
    assert top_tags(freq) == "hero, smile, red cape"
    assert top_tags(None) == "" and top_tags("{}") == ""
    assert prefill_prompt("a man and a woman, <lora:style:0.5> beach", "hero, red cape") == "a man and a woman, beach, hero, red cape"
    assert prefill_prompt("a man", "") == "a man"


BAD_VALUES = {  # per parser: values of the wrong type or out of any range, as an API request may send them
    "_bool": ["maybe", 2, None, [True]],
    "_float": ["abc", None, [0.3], True, float("nan"), "inf"],
    "_int": ["x", 1.5, None, True],
    "_str": [5, None, ["man"], {"a": 1}],
}
OUT_OF_RANGE = {"blend_start": [-0.1, 1.01], "self_attention_until": [-1, 2], "mask_dilation": [-1, 257],
                "mask_feather": [-8, 1000], "mask_source": ["sam", ""], "sam_model": ["vit_x"], "detector": ["yolo"],
                "instance_order": ["random"], "mode": ["quick", "Fast"], "concept_guidance": ["global"], "background": ["kept", ""], "mask_split": ["figure", "Pixels"], "unet_weight": [-100, 1e6], "te_weight": [float("-inf")],
                "class_word": ["", "   "], "prompt": [""]}


def _bad_cases():
    base = to_dict(_cfg())
    for table, where in ((FIELDS, "{}"), (CONCEPT_FIELDS, "concepts[1].{}")):
        for f in table:
            for bad in BAD_VALUES[f.parse.__name__] + OUT_OF_RANGE.get(f.attr, []):
                request = {**base, "concepts": [dict(c) for c in base["concepts"]]}
                if table is FIELDS:
                    request[f.attr] = bad
                else:
                    request["concepts"][0][f.attr] = bad
                yield pytest.param(request, where.format(f.attr), id=f"{where.format(f.attr)}={bad!r}")


@pytest.mark.parametrize("request_args, field", list(_bad_cases()))
def test_every_bad_api_value_is_refused_naming_its_field(request_args, field):
    """Generated from the field table: a new setting gets these cases without a new test."""
    with pytest.raises(OmgConfigError) as e:
        from_dict(request_args).validate()
    assert e.value.field == field
    assert field.rsplit(".", 1)[-1].replace("_", " ") in str(e.value).replace("_", " ")


def test_concept_loras_named_in_the_prompt_are_warned_about_once_each():
    cfg = OmgConfig(enabled=True, concepts=[ConceptSpec(lora="char1", class_word="man", prompt="a man"),
                                            ConceptSpec(lora="char2", class_word="woman", prompt="a woman"),
                                            ConceptSpec(class_word="cat", prompt="a cat")])
    warnings = concept_loras_in_prompt(cfg, ["a man and a woman <lora:CHAR1:0.8> <lyco:style:1>", "x <lora:char1>", "<lora:char2:1:0.5>"])
    assert [w.split("'")[2] for w in warnings] == ["char1", "char2"]
    assert warnings[0].startswith("OMG concept 1's LoRA 'char1' is also in the prompt (<lora:char1:…>)")
    assert concept_loras_in_prompt(cfg, ["a man and a woman <lora:char10:1> <lora:style:1>"]) == []
