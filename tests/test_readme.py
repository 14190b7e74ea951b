"""The documentation's commands work as written: every `carvana ...`, `python -m ...` and `torchrun ... -m`
line of the code blocks of README.md and docs/ parses, and its config file and overrides load (keys, types
and allowed values checked); every relative link resolves, anchors included."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from helpers import ROOT

from common.config import load_config
from pipelines.cli import parse

MODULES = {"pipelines": [], "stage1_lowres": ["stage1"], "stage2_fullres": ["stage2"]}
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


def doc_commands() -> list[tuple[str, str]]:
    lines = []
    for page in PAGES:
        for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if re.match(
                    r"(\.venv/bin/)?carvana |(python|torchrun .*) -m (pipelines|stage1_lowres|stage2_fullres) ", line
                ):
                    lines.append((page.relative_to(ROOT).as_posix(), line))
    return lines


def test_the_docs_have_commands_to_check():
    pages = {page for page, _ in doc_commands()}
    assert (
        len(doc_commands()) >= 20 and {"README.md", "docs/usage.md", "docs/distributed.md", "docs/cutout.md"} <= pages
    )


@pytest.mark.parametrize("page, line", doc_commands())
def test_documented_command_parses_and_its_config_loads(page, line, monkeypatch):
    monkeypatch.chdir(ROOT)
    words = shlex.split(line)
    if words[0].endswith("carvana"):
        argv = words[1:]
    else:  # python -m MODULE ... or torchrun [its options] -m MODULE ...
        m = words.index("-m")
        argv = MODULES[words[m + 1]] + words[m + 2 :]
    args = parse(argv)
    if hasattr(args, "overrides"):
        load_config(args.config, args.overrides)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.name}: link to {target}: no such heading"
