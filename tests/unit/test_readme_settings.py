"""The README's settings table is generated from ``Config`` and kept in sync."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from ulfmpy.config import Config, README_BEGIN, README_END, readme_with_settings, settings_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_table_matches_config():
    text = README.read_text(encoding="utf-8")
    assert README_BEGIN in text and README_END in text
    assert readme_with_settings(text) == text, (
        "the README's settings table is stale: run  python -m ulfmpy.config --write-readme")


def test_table_has_one_row_per_setting_with_flag_and_default():
    rows = [r for r in settings_table().splitlines() if r.startswith("| `")][1:]  # no header
    assert [r.split("`")[1] for r in rows] == [f.name for f in fields(Config)]
    row = next(r for r in rows if r.startswith("| `ckpt_every`"))
    assert "`--ckpt-every`" in row and "| `0` |" in row
    assert "| `30s` |" in next(r for r in rows if r.startswith("| `repair_timeout`"))
