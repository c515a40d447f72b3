"""The README tells the truth: CI runs its test command verbatim, and its CLI examples parse."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands(heading: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(heading, 1)[1]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.DOTALL).group(1)
    return [
        line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")
    ]


@pytest.mark.skipif(not (ROOT / ".ci" / "run").exists(), reason="not a source checkout")
def test_ci_runs_the_readme_test_command_verbatim():
    (test_command,) = readme_commands("### Run the tests")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_command in [line.strip() for line in ci]


@pytest.mark.skipif(not (ROOT / "README.md").exists(), reason="not a source checkout")
def test_readme_cli_examples_parse():
    from napari_deepwarp.cli import build_parser

    parser = build_parser()
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    examples = re.findall(r"^deepwarp (.+)$", text, re.MULTILINE)
    assert len(examples) >= 4
    for example in examples:
        parser.parse_args(shlex.split(example.split("  #")[0]))
