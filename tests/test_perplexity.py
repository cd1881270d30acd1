"""Perplexity: equal to a direct computation, one forward for all lengths, cache mode."""

from __future__ import annotations

import math

import pytest
import torch

import surgery
from surgery.data import is_heldout, load_text, pydoc_text
from surgery.errors import InvalidParams, SurgeryError
from surgery.evaluate import make_eval
from surgery.evaluate.perplexity import token_losses
from tests.conftest import char_tokenizer, tiny_model


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def direct_ppl(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


def test_matches_direct_computation_at_every_length(arch, tok):
    model = tiny_model(arch)
    result = make_eval("perplexity", lengths=[16, 50, 128]).run(model, tok)
    windows = make_eval("perplexity", lengths=[128]).windows(tok)
    assert windows[0, 0].item() == tok.bos_token_id
    for n in (16, 50, 128):  # positions below n depend only on their prefix: one forward serves all
        direct = direct_ppl(model, windows[:, :n])
        assert result.metrics[f"perplexity.ppl@{n}"] == pytest.approx(direct, rel=1e-5)
    assert result.details["tokens"] == 128 and len(result.details["ppl_by_position"]) == 64


def test_bands_and_samples(tok):
    model = tiny_model("llama")
    result = make_eval("perplexity", lengths=[96], band=32, samples=3, batch=2).run(model, tok)
    windows = make_eval("perplexity", lengths=[96], samples=3).windows(tok)
    assert windows.shape == (3, 96) and not torch.equal(windows[0], windows[1])
    with torch.no_grad():
        losses = token_losses(model, windows).double().mean(0)
    assert result.metrics["perplexity.band_ppl@32-64"] == pytest.approx(math.exp(losses[32:64].mean()), rel=1e-9)
    assert set(result.metrics) == {
        "perplexity.ppl@96",
        "perplexity.band_ppl@0-32",
        "perplexity.band_ppl@32-64",
        "perplexity.band_ppl@64-95",
    }


def test_chunked_cache_equals_single_pass_and_sees_fp8_quantization(tok):
    model = tiny_model("llama")
    single = make_eval("perplexity", lengths=[120]).run(model, tok).metrics["perplexity.ppl@120"]
    chunked = make_eval("perplexity", lengths=[120], chunk=16).run(model, tok).metrics["perplexity.ppl@120"]
    assert chunked == pytest.approx(single, rel=1e-4)
    model.generation_config.cache_implementation = "quantized"
    model.generation_config.cache_config = {"backend": "fp8"}
    quantized = make_eval("perplexity", lengths=[120], chunk=16).run(model, tok).metrics["perplexity.ppl@120"]
    # the cache was read back, quantized: far off the float-rounding noise of the unquantized chunks
    assert abs(quantized - single) / single > 1e-5
    assert abs(quantized - single) > 20 * abs(chunked - single)
    unchunked = make_eval("perplexity", lengths=[120]).run(model, tok).metrics["perplexity.ppl@120"]
    assert unchunked == single  # a single pass never reads the cache


def test_sliced_logits_match_full_logits_loss(tok):
    import surgery.evaluate.perplexity as ppl

    model = tiny_model("gemma3")  # final logit softcapping
    ids = make_eval("perplexity", lengths=[100]).windows(tok)
    with torch.no_grad():
        whole = token_losses(model, ids)
    original, ppl.LOGIT_SLICE = ppl.LOGIT_SLICE, 7
    try:
        with torch.no_grad():
            torch.testing.assert_close(token_losses(model, ids), whole, rtol=1e-5, atol=1e-6)
    finally:
        ppl.LOGIT_SLICE = original


def test_validation_and_short_text(tok, tmp_path):
    with pytest.raises(InvalidParams, match="lengths must be"):
        make_eval("perplexity", lengths=[1])
    with pytest.raises(InvalidParams, match="did you mean 'lengths'"):
        make_eval("perplexity", length=[8])
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(SurgeryError, match="has 9 tokens, fewer than 1 x 63"):
        make_eval("perplexity", lengths=[64], text=str(short)).run(tiny_model("llama"), tok)
    with pytest.raises(SurgeryError, match="needs a tokenizer"):
        make_eval("perplexity").run(tiny_model("llama"), None)


def test_pydoc_split_is_deterministic_and_disjoint():
    from pydoc_data.topics import topics

    held = [k for k in topics if is_heldout(k)]
    assert 0.1 < len(held) / len(topics) < 0.3
    train, heldout = pydoc_text("train"), pydoc_text("heldout")
    assert train == pydoc_text("train") and len(heldout) > 50_000
    for k in held[:20]:
        assert topics[k].strip()[:200] not in train


def test_local_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    assert load_text(str(tmp_path / "a.txt")) == "plain text"
    assert load_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    with pytest.raises(SurgeryError, match="line 1 has no 'text' field"):
        load_text(str(tmp_path / "c.jsonl"))
    with pytest.raises(SurgeryError, match="no such text source"):
        load_text(str(tmp_path / "missing.txt"))


def test_dataset_source_offline_is_one_clear_error(monkeypatch, no_network):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SurgeryError, match="could not load dataset 'nobody/nothing'"):
        load_text("hf:nobody/nothing")


@pytest.mark.slow
def test_embedded_model_matches_direct_computation():
    model, tokenizer = surgery.load_model("smollm2", dtype="float32")
    e = make_eval("perplexity", lengths=[1024])
    result = e.run(model, tokenizer).metrics["perplexity.ppl@1024"]
    assert result == pytest.approx(direct_ppl(model, e.windows(tokenizer)), rel=1e-4)
    assert 5 < result < 30  # English technical prose for a 135M model
    chunked = make_eval("perplexity", lengths=[1024], chunk=256)
    assert chunked.run(model, tokenizer).metrics["perplexity.ppl@1024"] == pytest.approx(result, rel=1e-4)
    model.generation_config.cache_implementation = "quantized"
    model.generation_config.cache_config = {"backend": "fp8"}
    try:
        fp8 = chunked.run(model, tokenizer).metrics["perplexity.ppl@1024"]
    finally:
        model.generation_config.cache_implementation = None
        model.generation_config.cache_config = None
    assert abs(fp8 - result) / result > 1e-3, (fp8, result)
