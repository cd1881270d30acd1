"""Gates: each rule passes, fails, and refuses malformed input; compare exits 0 / 1 / 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from surgery.cli import main
from surgery.errors import GateError
from surgery.evaluate.base import EvalResult
from surgery.evaluate.gates import evaluate_gates, parse_gate
from surgery.evaluate.report import Report

BEFORE = {"perplexity.ppl@2048": 10.0, "needle.acc@4096": 0.9, "harness.cloze.acc": 0.50, "harness.lambada.acc": 0.40}
AFTER = {"perplexity.ppl@2048": 10.4, "needle.acc@4096": 0.6, "harness.cloze.acc": 0.49, "harness.lambada.acc": 0.30}


def outcome(gate: str) -> list[bool]:
    return [o.passed for o in evaluate_gates([parse_gate(gate)], BEFORE, AFTER)]


@pytest.mark.parametrize(
    "gate, passed",
    [
        ("perplexity.ppl@2048:max_increase=5%", [True]),  # +4%
        ("perplexity.ppl@2048:max_increase=3%", [False]),
        ("perplexity.ppl@2048:max_increase=0.5", [True]),  # absolute +0.4
        ("perplexity.ppl@2048:max_increase=0.3", [False]),
        ("needle.acc@4096:max_decrease=0.1", [False]),  # dropped 0.3
        ("needle.acc@4096:max_decrease=40%", [True]),  # dropped 33%
        ("needle.acc@4096:min=0.5", [True]),
        ("needle.acc@4096:min=0.9", [False]),
        ("perplexity.ppl@2048:max=10.5", [True]),
        ("perplexity.ppl@2048:max=10", [False]),
        ("perplexity.ppl@2048:min_recovery=0.95", [True]),  # lower is better: 10/10.4 = 0.96
        ("perplexity.ppl@2048:min_recovery=0.97", [False]),
        ("harness.*:min_recovery=0.95", [True, False]),  # cloze kept 98%, lambada 75%
        ("perplexity.ppl@2048:max=11,max_increase=1%", [True, False]),
    ],
)
def test_rules(gate, passed):
    assert outcome(gate) == passed


@pytest.mark.parametrize(
    "gate, message",
    [
        ("perplexity.ppl@2048", "write METRIC:RULE=VALUE"),
        ("perplexity.ppl@2048:", "write METRIC:RULE=VALUE"),
        ("perplexity.ppl@2048:max_increse=5%", "did you mean 'max_increase'"),
        ("perplexity.ppl@2048:max_increase=lots", "needs a number"),
        ("perplexity.ppl@2048:max_increase", "needs a number"),
        ("needle.acc@4096:min=90%", "only max_increase and max_decrease take a percentage"),
    ],
)
def test_malformed_gates(gate, message):
    with pytest.raises(GateError, match=message):
        parse_gate(gate)


def test_gate_on_missing_metric_or_baseline():
    with pytest.raises(GateError, match="did you mean 'perplexity.ppl@2048'"):
        evaluate_gates([parse_gate("perplexity.ppl@2049:max=3")], BEFORE, AFTER)
    with pytest.raises(GateError, match="needs a baseline"):
        evaluate_gates([parse_gate("needle.acc@4096:min_recovery=0.9")], {}, AFTER)
    assert [o.passed for o in evaluate_gates([parse_gate("needle.acc@4096:min=0.5")], None, AFTER)] == [True]


def write(path, metrics):
    results = [EvalResult(name=m.split(".")[0], params={}, metrics={m: v}) for m, v in metrics.items()]
    path.write_text(Report(model=path.stem, results=results).model_dump_json())
    return str(path)


def test_compare_command_exit_codes(tmp_path):
    before, after = write(tmp_path / "before.json", BEFORE), write(tmp_path / "after.json", AFTER)
    runner = CliRunner()
    ok = runner.invoke(main, ["compare", before, after, "--gate", "perplexity.ppl@2048:max_increase=5%"])
    assert ok.exit_code == 0, ok.output
    assert "| perplexity.ppl@2048 | 10 | 10.4 | 0.4 | +4.00% ▼ |" in ok.output
    assert "all 1 gate checks passed" in ok.output
    bad = runner.invoke(
        main, ["compare", before, after, "--gate", "needle.acc@4096:min=0.9", "-o", str(tmp_path / "cmp")]
    )
    assert bad.exit_code == 1
    assert "**FAIL**" in (tmp_path / "cmp" / "comparison.md").read_text()
    gates = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["gates"]
    assert gates[0]["passed"] is False and gates[0]["after"] == 0.6
    malformed = runner.invoke(main, ["compare", before, after, "--gate", "needle.acc@4096:minimum=1"])
    assert malformed.exit_code == 2 and malformed.stderr.startswith("error: bad gate")
    missing = runner.invoke(main, ["compare", before, str(tmp_path / "nope.json")])
    assert missing.exit_code == 2 and "no results file" in missing.stderr
    (tmp_path / "junk.json").write_text('{"model": 3}')
    junk = runner.invoke(main, ["compare", before, str(tmp_path / "junk.json")])
    assert junk.exit_code == 2 and "is not a surgery results file" in junk.stderr
