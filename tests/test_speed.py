"""speed: KV bytes measured from the cache object agree with the formula."""

from __future__ import annotations

import pytest

from surgery.arch import kv_cache_bytes
from surgery.evaluate import make_eval
from tests.conftest import char_tokenizer, tiny_model


@pytest.mark.parametrize("arch, tolerance", [("llama", 0.0), ("qwen3", 0.0), ("gemma3", 1e-3)])
def test_measured_kv_bytes_match_formula(arch, tolerance):
    model = tiny_model(arch, max_position_embeddings=512)
    result = make_eval("speed", context=100, decode=4, batch=2).run(model, char_tokenizer())
    m = result.metrics
    assert m["speed.kv_bytes_ratio"] == pytest.approx(1.0, abs=tolerance)
    assert result.details["kv_bytes_formula"] == kv_cache_bytes(model.config, 104, 4, batch=2)
    assert m["speed.kv_bytes@104"] == result.details["kv_bytes_formula"] * m["speed.kv_bytes_ratio"]
    seconds = result.details["prefill_s"], result.details["decode_s"]
    assert m["speed.prefill_tok_s"] == pytest.approx(2 * 100 / seconds[0], rel=1e-12)  # batch x context tokens
    assert m["speed.decode_tok_s"] == pytest.approx(2 * 4 / seconds[1], rel=1e-12)
    assert m["speed.decode_ms"] == pytest.approx(1000 * seconds[1] / 4, rel=1e-12)


def test_fp8_cache_is_a_quarter_of_fp32():
    model = tiny_model("llama", max_position_embeddings=512)
    model.generation_config.cache_implementation = "quantized"
    model.generation_config.cache_config = {"backend": "fp8"}
    result = make_eval("speed", context=100, decode=4).run(model, char_tokenizer())
    assert result.details["cache"] == "QuantizedCache"
    assert result.metrics["speed.kv_bytes_ratio"] == pytest.approx(0.25, abs=0.002)
