"""docs/faithfulness.md's table of switches is true to the settings and the presets it names."""
from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import yaml

from paper_lib import config

DOC = config.PROJECT_ROOT / "docs" / "faithfulness.md"
PRESETS = ("tiny", "smol", "qwen7b", "llama11b")
# Choice-valued settings on which the presets differ without choosing between sources: precision, not fidelity
NOT_SWITCHES = {"model.dtype"}


def switch_rows(text: str) -> dict[str, dict[str, str]]:
    """The table's rows by setting, each cell by its column's header."""
    lines = [l for l in text.splitlines() if l.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        setting = re.fullmatch(r"`([a-z_]+\.[a-z_0-9]+)`", cells[0])
        if setting:
            rows[setting.group(1)] = dict(zip(header, cells))
    return rows


def values(cell: str) -> list:
    """Every value in backticks in a cell, read as YAML (as a preset file would give it)."""
    return [yaml.safe_load(v) for v in re.findall(r"`([^`]*)`", cell)]


def loaded(cfg: config.Config, setting: str):
    section, name = setting.split(".")
    value = getattr(getattr(cfg, section), name)
    return list(value) if isinstance(value, tuple) else value


ROWS = switch_rows(DOC.read_text())


def test_the_table_has_rows():
    assert len(ROWS) >= 25, sorted(ROWS)


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_column_is_what_the_preset_loads(preset):
    cfg = config.load(preset)
    wrong = {}
    for setting, row in ROWS.items():
        documented, *more = values(row[preset]) or [None]
        assert not more and documented is not None, f"{setting}: the {preset} column needs one value in backticks"
        # coerced as a preset file's value would be (YAML reads 1e-7 as a string; config makes it a float)
        as_setting = loaded(config.load(preset, **{setting: documented}), setting)
        if as_setting != loaded(cfg, setting):
            wrong[setting] = (documented, loaded(cfg, setting))
    assert not wrong, f"docs/faithfulness.md's {preset} column against config.load({preset!r}): {wrong}"


@pytest.mark.parametrize("column", ["paper's text", "authors' code"])
def test_every_source_value_is_one_the_setting_accepts(column):
    for setting, row in ROWS.items():
        for value in values(row[column]):
            try:
                config.load("tiny", **{setting: value})
            except config.ConfigError as err:
                pytest.fail(f"docs/faithfulness.md, {setting}, {column}: {value!r} is refused: {err}")


def choice_settings():
    """Every setting whose type is a Literal, or a tuple of Literals (a choice among named ways), as section.name."""
    for section, cls in typing.get_type_hints(config.Config).items():
        if dataclasses.is_dataclass(cls):
            for name, tp in typing.get_type_hints(cls).items():
                item = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else tp
                if typing.get_origin(item) is typing.Literal:
                    yield f"{section}.{name}"


def test_every_choice_the_presets_differ_on_has_a_row():
    cfgs = [config.load(p) for p in PRESETS]
    differing = {s for s in choice_settings() if len({str(loaded(c, s)) for c in cfgs}) > 1}
    missing = differing - set(ROWS) - NOT_SWITCHES
    assert not missing, f"settings the presets set differently, absent from docs/faithfulness.md: {sorted(missing)}"
