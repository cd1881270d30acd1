"""The README's `surgery check` lines, on the embedded model, as a user would type them: the
patched models made as the README says, then every line planned and timed (`--dry-run`, in the
default run) and run for real (heavy: minutes each). None may exit 2."""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from surgery.cli import main

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parent.parent / "README.md"


def check_lines() -> list[list[str]]:
    """The `surgery check ...` commands of the README's Check section, as argument lists."""
    section = README.read_text().split("\n## Check\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("surgery check ")]
    return [shlex.split(line)[1:] for line in lines]


def made_by(text: str) -> dict[str, list[str]]:
    """The `surgery apply` commands the Check section names for its inputs, by output."""
    out = {}
    for command in re.findall(r"`(surgery apply [^`]+)`", text):
        args = shlex.split(command)[1:]
        out[args[args.index("-o") + 1]] = args
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory holding the patched models the README's check lines read (./smollm2-mqa, ...)."""
    root = tmp_path_factory.mktemp("readme")
    section = README.read_text().split("\n## Check\n", 1)[1].split("\n## ", 1)[0]
    inputs = made_by(section)
    assert set(inputs) == {"smollm2-mqa", "smollm2-kv2"}, inputs
    for name, args in inputs.items():
        args = [str(root / a) if a == name else a for a in args]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    return root


def test_the_readme_has_the_check_lines():
    lines = check_lines()
    assert len(lines) == 3 and all(line[:2] == ["check", "smollm2"] for line in lines)
    assert any("--dry-run" in line for line in lines) and any("--budget" in line for line in lines)


@pytest.mark.parametrize("args", check_lines(), ids=lambda a: " ".join(a[2:]))
def test_each_readme_check_line_plans_and_times_without_a_refusal(args, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    args = args if "--dry-run" in args else [*args, "--dry-run"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "dry run: nothing measured" in result.output
    minutes = re.search(r"(?:estimated|about) ([\d.]+) min", result.output)
    assert minutes, result.output
    if "--budget" in args:  # the battery sized to the budget, with at most 20% over
        budget = float(args[args.index("--budget") + 1])
        assert float(minutes.group(1)) <= 1.2 * budget, result.output
    assert not list(workdir.glob("*-check")), "a dry run wrote a report"


@pytest.mark.heavy  # the budgets themselves: 15 and 10 minutes on 2 cores
@pytest.mark.parametrize("args", [a for a in check_lines() if "--budget" in a], ids=lambda a: " ".join(a[2:]))
def test_each_readme_check_line_runs_within_its_budget(args, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    start = time.perf_counter()
    result = CliRunner().invoke(main, [*args, "--force"])
    minutes = (time.perf_counter() - start) / 60
    assert result.exit_code in (0, 1, 3), result.output
    budget = float(args[args.index("--budget") + 1])
    assert minutes <= 1.2 * budget + 1, (minutes, result.output[-2000:])  # + a minute of loading
    if "smollm2-mqa" in args[2]:
        assert result.exit_code == 1, result.output[-2000:]  # mean-pooled MQA is destructive
