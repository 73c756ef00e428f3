"""The README's command synopsis and the parser stay in step: every flag of every command is in
the synopsis, and the synopsis names no flag the command does not take."""

from __future__ import annotations

import re

import pytest

from flows.cli import build_parser
from tests.conftest import REPO


def parser_flags() -> dict[str, set[str]]:
    """Each subcommand's long options (--help aside)."""
    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return {
        name: {o for a in sub._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
        for name, sub in commands.choices.items()
    }


def synopsis_flags(readme: str) -> dict[str, set[str]]:
    """Each `gptpipe COMMAND` entry of the README's "Command line" block and its flags."""
    section = readme.split("## Command line", 1)[1]
    block = re.search(r"^```\n(.*?)^```", section, re.M | re.S)[1]
    found: dict[str, set[str]] = {}
    command = None
    for line in block.splitlines():
        head = re.match(r"gptpipe (\w+)", line)
        if head:
            command = head[1]
            found[command] = set()
        assert command is not None, line
        found[command] |= set(re.findall(r"--[a-z][a-z-]*", line))
    return found


def test_the_readme_synopsis_lists_exactly_the_parser_flags():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert synopsis_flags(readme) == parser_flags()


def test_the_check_sees_a_missing_flag():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    drifted = readme.replace(" [--train-timeout SECONDS]", "", 1)
    assert drifted != readme
    with pytest.raises(AssertionError):
        assert synopsis_flags(drifted) == parser_flags()
