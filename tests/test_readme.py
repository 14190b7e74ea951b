"""The README's commands work as written: every `carvana ...`, `python -m ...` and `torchrun ... -m` line of its code
blocks parses, and its config file and overrides load (keys, types and allowed values checked)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from common.config import load_config
from pipelines.cli import parse

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"pipelines": [], "stage1_lowres": ["stage1"], "stage2_fullres": ["stage2"]}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if re.match(r"(\.venv/bin/)?carvana |(python|torchrun .*) -m (pipelines|stage1_lowres|stage2_fullres) ", line):
                lines.append(line)
    return lines


def test_the_readme_has_commands_to_check():
    assert len(readme_commands()) >= 10


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_parses_and_its_config_loads(line, monkeypatch):
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
