"""Gates: each rule passes, fails, and refuses malformed input; compare exits 0 / 1 / 2."""

from __future__ import annotations

import json
import math

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


def est(value, half, n=40):
    from surgery.evaluate.stats import Estimate

    return Estimate(value, value - half, value + half, n)


@pytest.mark.parametrize(
    "gate, after, status",
    [
        ("perplexity.ppl@2048:max_increase=5%,confidence=0.95", est(10.2, 0.1), "pass"),  # +2% ± ~1.4%
        ("perplexity.ppl@2048:max_increase=5%,confidence=0.95", est(11.0, 0.1), "fail"),  # +10% ± 1.4%
        ("perplexity.ppl@2048:max_increase=5%,confidence=0.95", est(10.45, 0.4), "inconclusive"),
        ("perplexity.ppl@2048:max=11,confidence=0.95", est(10.5, 0.2), "pass"),
        ("perplexity.ppl@2048:max=11,confidence=0.95", est(10.9, 0.2), "inconclusive"),
        ("perplexity.ppl@2048:max=11,confidence=0.95", est(11.3, 0.2), "fail"),
        ("perplexity.ppl@2048:min_recovery=0.9,confidence=0.95", est(10.5, 0.1), "pass"),  # 10/10.5 = 0.95
        ("perplexity.ppl@2048:min_recovery=0.9,confidence=0.95", est(11.1, 0.3), "inconclusive"),
        ("perplexity.ppl@2048:min_recovery=0.9,confidence=0.95", est(13.0, 0.3), "fail"),
    ],
)
def test_confidence_gates(gate, after, status):
    before = {"perplexity.ppl@2048": est(10.0, 0.1)}
    out = evaluate_gates(
        [parse_gate(gate)],
        {"perplexity.ppl@2048": 10.0},
        {"perplexity.ppl@2048": after.value},
        (before, {"perplexity.ppl@2048": after}),
    )
    assert [o.status for o in out] == [status]
    assert out[0].passed == (status == "pass")
    if status == "inconclusive":
        assert out[0].needed and out[0].needed > 40 and "samples" in out[0].message


def test_confidence_on_wilson_accuracy():
    """Two prompts, both right: min=0.5 cannot be told at 95% (Wilson [0.34, 1]); 45 prompts can."""
    from surgery.evaluate.stats import wilson

    gate = parse_gate("needle.acc@4096:min=0.5,confidence=0.95")
    for n, status in ((2, "inconclusive"), (45, "pass")):
        acc = wilson(n, n)
        (o,) = evaluate_gates([gate], None, {"needle.acc@4096": acc.value}, ({}, {"needle.acc@4096": acc}))
        assert o.status == status


def _old_point_fallback():
    (o,) = evaluate_gates([parse_gate("perplexity.ppl@2048:max=11,confidence=0.95")], BEFORE, AFTER)
    assert o.status == "pass" and "point estimate" in o.message


@pytest.mark.parametrize("gate", ["perplexity.ppl@2048:max=3,confidence=2", "perplexity.ppl@2048:confidence=0.95"])
def test_bad_confidence(gate):
    with pytest.raises(GateError, match="confidence"):
        parse_gate(gate)


def test_compare_exits_3_when_inconclusive(tmp_path):
    from surgery.evaluate.stats import wilson

    def write_acc(path, hits, n):
        acc = wilson(hits, n)
        result = EvalResult(
            name="needle",
            params={},
            metrics={"needle.acc": acc.value},
            intervals={"needle.acc": (acc.low, acc.high)},
            counts={"needle.acc": n},
        )
        path.write_text(Report(model=path.stem, results=[result]).model_dump_json())
        return str(path)

    before, after = write_acc(tmp_path / "b.json", 2, 2), write_acc(tmp_path / "a.json", 1, 2)
    res = CliRunner().invoke(main, ["compare", before, after, "--gate", "needle.acc:max_decrease=0.2,confidence=0.95"])
    assert res.exit_code == 3, res.output
    assert "inconclusive" in res.output and "[" in res.output  # the table shows intervals


def test_agreeing_samples_are_not_certainty():
    """30 prompts that all agree bound a change by the rule of three (±3/30), not by zero; one
    prompt bounds nothing."""
    from surgery.evaluate.stats import mean_interval, paired

    same = mean_interval([1.0] * 30, bounded=True)
    d = paired(same, same)
    assert d.low == pytest.approx(-math.log(20) / 30) and d.high == pytest.approx(math.log(20) / 30)  # ~3/30
    # one disagreement in 30 does not buy a narrower interval than none (t alone would give ±0.068)
    one_off = paired(same, mean_interval([1.0] * 29 + [0.0], bounded=True))
    assert one_off.high - one_off.low >= d.high - d.low - 1e-12
    (o,) = evaluate_gates(
        [parse_gate("ruler.avg:max_decrease=0.05,confidence=0.95")],
        {"ruler.avg": 1.0},
        {"ruler.avg": 1.0},
        ({"ruler.avg": same}, {"ruler.avg": same}),
    )
    assert o.status == "inconclusive"
    one = mean_interval([1.0], bounded=True)
    assert (one.low, one.high) == (0.0, 1.0)  # the whole range a score can take
    d = paired(one, mean_interval([0.0], bounded=True))
    assert (d.low, d.high) == (-1.0, 1.0)


@pytest.mark.parametrize("gate", ["ruler.avg:max_decrease=10%", "ruler.avg:min_recovery=0.9"])
def test_relative_gate_on_zero_baseline_is_a_user_error(gate):
    with pytest.raises(GateError, match="baseline of 0"):
        evaluate_gates([parse_gate(gate)], {"ruler.avg": 0.0}, {"ruler.avg": 0.0})


def test_confidence_without_interval_is_inconclusive():
    (o,) = evaluate_gates([parse_gate("perplexity.ppl@2048:max=11,confidence=0.95")], BEFORE, AFTER)
    assert o.status == "inconclusive" and "no interval" in o.message


@pytest.mark.parametrize(
    "interval, units, message",
    [
        ((1.0, 0.95), None, "outside its interval"),
        ((0.95, 0.99), None, "outside its interval"),
        ((0.4, 0.6), [1.0, 0.0, 1.0], "units but a count"),
    ],
)
def test_compare_refuses_malformed_intervals(tmp_path, interval, units, message):
    result = EvalResult(
        name="needle",
        params={},
        metrics={"needle.acc": 0.5},
        intervals={"needle.acc": interval},
        counts={"needle.acc": 2},
        units={"needle.acc": units} if units else {},
    )
    path = tmp_path / "r.json"
    path.write_text(Report(model="m", results=[result]).model_dump_json())
    res = CliRunner().invoke(main, ["compare", str(path), str(path)])
    assert res.exit_code == 2 and message in res.output
