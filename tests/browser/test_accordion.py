"""The whole accordion built by the hosts' own gradio (3.41 and 4.40): one component per
setting in the order ``config.from_args`` reads them, each with its default, its dropdown
choices from ``config.CHOICES`` and its infotext name — what the WebUI passes to the Script
and what "Send to txt2img" pastes back. Skipped, with the reason, without that gradio."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from omg_ext.config import ARGS_COUNT, CHOICES, CONCEPT_FIELDS, FIELDS, MAX_CONCEPTS, OmgConfig, from_args
from tests.support.gradio_venvs import gradio_python

EXPECTED_NAMES = [f.infotext for f in FIELDS] + [f.infotext.format(n=n) for n in range(1, MAX_CONCEPTS + 1) for f in CONCEPT_FIELDS]


@pytest.fixture(scope="module", params=[3, 4], ids=["gradio3", "gradio4"])
def accordion(request, tmp_path_factory) -> dict:
    python = gradio_python(request.param)
    if python is None:
        pytest.skip(f"no Python with gradio {request.param} (.venvs/gradio{request.param} or OMG_GRADIO{request.param}_PYTHON)")
    script = tmp_path_factory.mktemp("accordion") / "accordion_dump.py"
    shutil.copy(Path(__file__).with_name("accordion_dump.py"), script)
    done = subprocess.run([python, str(script), str(Path(__file__).resolve().parents[2])], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["gradio"].startswith(f"{request.param}.")
    return out


def test_the_accordion_passes_one_value_per_setting_and_its_defaults_parse_to_the_default_settings(accordion):
    values = [c["value"] for c in accordion["components"]]
    assert len(values) == ARGS_COUNT
    assert from_args(values) == OmgConfig()


def test_each_component_pastes_back_under_its_own_infotext_name(accordion):
    assert [c["infotext"] for c in accordion["components"]] == EXPECTED_NAMES


def test_the_dropdowns_offer_the_settings_choices(accordion):
    by_attr = {f.attr: c for f, c in zip(FIELDS, accordion["components"])}
    for attr, choices in CHOICES.items():
        assert by_attr[attr]["kind"] == "Dropdown", attr
        assert by_attr[attr]["choices"] == list(choices), attr
        assert by_attr[attr]["value"] in choices, attr
