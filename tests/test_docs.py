"""The README names every entry point and stays short; the code map's glossary names real flags and keys."""
from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 150
STAGE_SCRIPTS = ("train_dp", "save_dp_db_stats", "synthesize", "train_student")
SECTIONS = {"teacher": "TeacherConfig", "statistics": "StatisticsConfig", "synthesis": "SynthesisConfig",
            "student": "StudentConfig"}


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the first table under ``heading`` (header and separator rows left out)."""
    assert heading in markdown, f"no {heading!r} section"
    section = markdown.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]


def entry_points() -> list[str]:
    """Every script a user runs: the top-level .py files with a ``__main__`` guard, and scripts/."""
    top = [path.name for path in ROOT.glob("*.py") if 'if __name__ == "__main__"' in path.read_text()]
    scripts = [path.relative_to(ROOT).as_posix() for path in (ROOT / "scripts").rglob("*.py")]
    return sorted(top + scripts)


def test_readme_is_short_and_keeps_its_commands_and_sweep_table():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    assert "make demo" in text and "make test" in text
    assert text.count("<!-- sweep -->") == 1 and text.count("<!-- /sweep -->") == 1
    assert text.index("<!-- sweep -->") < text.index("<!-- /sweep -->")


def test_readme_table_names_every_entry_point_with_a_doc_page():
    rows = table_rows(README.read_text(), "## Entry points")
    named = {row[0].strip("`"): row for row in rows}
    assert entry_points() and set(entry_points()) <= set(named)
    for script in entry_points():
        _, what, page = named[script]
        assert what and re.search(r"\]\(docs/[\w.-]+\.md(#[\w-]+)?\)", page), script
    assert "scripts/DP/<set>/kd_resnet18_resnet18/run.sh" in named
    assert (ROOT / "scripts/DP/mnist/kd_resnet18_resnet18/run.sh").is_file()


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda path: path.name)
def test_relative_links_reach_a_file_and_heading(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if "://" in target:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.exists(), f"{page.name} links to missing {target}"
        if anchor:
            assert anchor in anchors(path), f"{page.name} links to a missing heading {target}"


def flags_of(script: str) -> set[str]:
    parser = importlib.import_module(script).build_parser()
    return {flag for action in parser._actions for flag in action.option_strings}


def keys_of(config: type) -> set[str]:
    """The names a pipeline section accepts for a config: its fields and their aliases."""
    return {name for field in dataclasses.fields(config) for name in (field.name, *field.metadata.get("aliases", ()))}


def test_glossary_flags_and_pipeline_keys_exist():
    from stages import config as pipeline_config
    from stages.paper import ROW_KEYS

    rows = table_rows((ROOT / "docs" / "code_map.md").read_text(), "## Glossary")
    assert {"k", "sigma", "C", "delta", "T", "eta_bn", "Omega_bn", "bn", "oh", "tv", "l2"} <= {row[0] for row in rows}
    stage_flags = {script: flags_of(script) for script in STAGE_SCRIPTS}
    top_level = keys_of(pipeline_config.PipelineSettings) | ROW_KEYS
    checked = 0
    for symbol, _, flags, keys in rows:
        for script, flag in re.findall(r"`(?:(\w+)\.py )?(--\w+)`", flags):
            known = stage_flags[script] if script else set().union(*stage_flags.values())
            assert flag in known, f"glossary row {symbol}: no flag {flag} in {script or 'the stage scripts'}"
            checked += 1
        for key in re.findall(r"`([\w.]+)`", keys):
            section, _, name = key.rpartition(".")
            known = keys_of(getattr(pipeline_config, SECTIONS[section])) if section else top_level
            assert name in known, f"glossary row {symbol}: no pipeline key {key}"
            checked += 1
    assert checked >= 2 * len(rows) - 6  # rows without a flag or key (q, N) say so with a dash
