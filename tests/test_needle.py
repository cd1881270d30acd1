"""Passkey grid: exact prompt lengths, needle at the requested depth, exact-match scoring."""

from __future__ import annotations

import pytest
import torch

import surgery
from surgery.errors import InvalidParams, SurgeryError
from surgery.evaluate import make_eval
from surgery.evaluate.needle import NEEDLE, first_number
from surgery.evaluate.report import Report, plot_needle
from tests.conftest import char_tokenizer, tiny_model


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_prompts_have_exact_length_and_needle_depth(tok):
    e = make_eval("needle", lengths=[400, 900], depths=[0, 0.5, 1], seed=3, trials=1)
    hay = e.haystack_tokens(tok)
    cells = e.cells()
    assert len(cells) == 6 and all(len(k) == 5 for _, _, k in cells)
    assert cells == make_eval("needle", lengths=[400, 900], depths=[0, 0.5, 1], seed=3, trials=1).cells()
    for n, d, k in cells:
        ids = e.prompt(tok, n, d, k, hay)
        assert len(ids) == n and ids[0].item() == tok.bos_token_id
        text = tok.decode(ids, skip_special_tokens=True).replace(" ", "")  # char tokens decode space-joined
        needle = NEEDLE.format(key=k).replace(" ", "")
        where = text.index(needle)
        start, end = text.index("thepasskey.") + len("thepasskey."), text.index("Whatisthepasskey")
        assert abs((where - start) / (end - len(needle) - start) - d) < 0.02


def test_run_on_tiny_model_reports_grid(tok):
    model = tiny_model("llama", max_position_embeddings=512)
    result = make_eval("needle", lengths=[300], depths=[0.2, 0.8], trials=2, batch=3).run(model, tok)
    assert set(result.metrics) == {"needle.acc", "needle.acc@300"}
    assert set(result.details["grid"]["300"]) == {"0.2", "0.8"}
    assert len(result.details["answers"]) == 4
    # a random model does not know the key
    assert result.metrics["needle.acc"] == 0.0


def test_scoring_is_exact_match_on_the_first_number():
    assert first_number(" 71432. Remember") == "71432"
    assert first_number(" 7143") == "7143" != "71432"
    assert first_number(" the key") is None


def test_validation(tok):
    with pytest.raises(InvalidParams, match="depths must be fractions"):
        make_eval("needle", depths=[1.5])
    e = make_eval("needle", lengths=[40])
    with pytest.raises(SurgeryError, match="too short for the prompt"):
        e.prompt(tok, 40, 0.5, "12345", e.haystack_tokens(tok))


def test_heatmap(tmp_path):
    from surgery.evaluate.base import EvalResult

    grid = {"1024": {"0.0": 1.0, "0.5": 0.0}, "4096": {"0.0": 1.0, "0.5": 1.0}}
    report = Report(model="m", results=[EvalResult(name="needle", params={}, metrics={}, details={"grid": grid})])
    assert plot_needle({"a": report, "b": report}, tmp_path / "n.png").stat().st_size > 10_000


@pytest.mark.heavy  # 45 prompts of 1k tokens on the embedded model: minutes on 2 cores
def test_embedded_model_finds_the_passkey_at_1k():
    model, tokenizer = surgery.load_model("smollm2", dtype="float32")
    result = make_eval("needle", lengths=[1024], batch=9).run(model, tokenizer)  # 45 prompts by default
    assert result.metrics["needle.acc@1024"] >= 0.8, result.details["answers"]
    low, high = result.intervals["needle.acc@1024"]
    assert result.counts["needle.acc@1024"] == 45 and high - low <= 0.3
    assert torch.is_grad_enabled()
