"""Every `lnull ...` command README.md shows runs as written: each is composed and validated exactly as the CLI
does before it runs anything (sweeps value by value); `lnull --help` is run."""
from __future__ import annotations

import re
import shlex
import sys

import pytest

import lnull.compose
from conftest import REPO

README = REPO / "README.md"
PLACEHOLDERS = {"N": "4"}  # `eval.limit=N` in prose


def readme_commands() -> list[str]:
    """`lnull` command lines of README.md's fenced code blocks (comments dropped), then those of its inline code
    spans (placeholders filled in)."""
    fenced, inline, in_block = [], [], False
    for line in README.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            text = line.strip().removeprefix("$ ")
            if text.startswith("lnull ") or text == "lnull":
                fenced.append(text.split("  #")[0].split(" # ")[0].strip())
        else:
            inline += [span for span in re.findall(r"`(lnull(?: [^`]*)?)`", line) if "<" not in span]
    inline = [re.sub(r"=([A-Z])\b", lambda m: "=" + PLACEHOLDERS.get(m.group(1), m.group(1)), span) for span in inline]
    return list(dict.fromkeys(fenced + inline))


COMMANDS = readme_commands()


def test_readme_shows_the_commands_this_test_checks():
    assert len(COMMANDS) >= 15, COMMANDS
    assert "lnull evaluate +experiment=demo eval=[knowledge,math] eval.limit=100 eval.models=[base]" in COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_composes(command, capsys, monkeypatch):
    from lnull.cli import COMMANDS as CLI_COMMANDS
    from lnull.cli import _check_overrides, main
    from lnull.compose import check_group_choices

    words = shlex.split(command)[1:]
    if not words or words[0] in ("--help", "-h", "help"):
        monkeypatch.setattr(sys, "argv", list(sys.argv))
        main(words)
        assert "commands:" in capsys.readouterr().out
        return
    name, overrides = words[0], words[1:]
    assert name in CLI_COMMANDS, command
    if name == "store":
        assert overrides and overrides[0] in ("ls", "du", "gc"), command
        overrides = [o for o in overrides[1:] if not o.startswith("--")]
    if "--from" in overrides:
        pytest.skip("runs a run folder's own config.yaml (tests/test_integrity.py runs it)")
    overrides = ["table.audit=true" if o == "--audit" else o for o in overrides]
    composed = []
    real = lnull.compose.compose
    monkeypatch.setattr(lnull.compose, "compose", lambda o: composed.append(o) or real(o))
    check_group_choices(overrides)
    _check_overrides(overrides)  # what `lnull` runs before Hydra: compose + validate, each value of a sweep
    sweeps = [o for o in overrides if "," in o and "[" not in o]
    assert len(composed) == 1 + sum(o.count(",") for o in sweeps) if "-m" in overrides else len(composed) == 1
