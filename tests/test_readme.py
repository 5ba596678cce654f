"""The README is for users, and must not drift from the code: its settings table is the settings, its API
example is a request OMG accepts, its links and pictures exist."""
import json
import pathlib
import re

from omg_ext.config import CONCEPT_FIELDS, FIELDS, ConceptSpec, OmgConfig, from_dict

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def settings_rows(text: str) -> list[tuple[str, str]]:
    """(API name, default as written) of each row of the settings table."""
    return re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", text, flags=re.M)


def test_the_readme_is_short_and_shows_install_and_the_test_command():
    assert len(README.splitlines()) <= 300
    assert "git clone https://github.com/sd-webui-omg/sd-webui-omg extensions/sd-webui-omg" in README
    assert "pip install -r requirements-dev.txt && python -m pytest" in README


def test_the_settings_table_lists_every_setting_in_order_with_its_default():
    rows = settings_rows(_section("Settings"))
    assert [name for name, _ in rows] == [f.attr for f in FIELDS] + [f.attr for f in CONCEPT_FIELDS]
    defaults = {**vars(OmgConfig()), **vars(ConceptSpec())}
    for name, written in rows:
        assert json.loads(written) == defaults[name], f"README says {name} defaults to {written}, the code {defaults[name]!r}"


def test_the_settings_table_parser_sees_a_changed_default():
    rows = settings_rows("| `blend_start` | `0.3` | x | y |\n| not a row |")
    assert rows == [("blend_start", "0.3")]


def test_the_api_example_is_a_request_omg_accepts_with_the_default_blend_start():
    example = json.loads(re.search(r"```json\n(.*?)```", _section("Quick start (API)"), flags=re.S).group(1))
    settings = example["alwayson_scripts"]["OMG multi-concept"]["args"][0]
    cfg = from_dict(settings).validate()
    assert cfg.enabled and len(cfg.concepts) == 2 and cfg.blend_start == OmgConfig().blend_start


def test_every_link_and_picture_of_the_readme_and_docs_exists():
    for doc in [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not target.startswith("http"):
                assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)} links to {target}, which is missing"
