"""`mla`: attention converted to multi-head latent attention, as a stock DeepseekV3 checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, DynamicCache

import surgery
from surgery.arch import kv_cache_bytes
from surgery.cli import main
from surgery.errors import InvalidParams, UnsupportedModel
from surgery.evaluate.cache import cache_bytes
from tests.conftest import char_tokenizer, logits, tiny_model, tokens

D = 16  # the tiny models' head dim (64 hidden / 4 heads)

# Full rank, one kv head: the conversion is exact up to float32 rounding (the latent route
# multiplies in another order) and the norm's constant channel, whose scale moves by < 5e-7 relative
# by construction. Logits of the tiny models are O(1), so 1e-5 is ~20x the largest error seen.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def full_rank(model, **params):
    """mla keeping everything: all RoPE dimensions, a latent as wide as the values plus the constant."""
    return surgery.apply(model, "mla", kv_rank=D + 1, rope_dim=D, method="svd", **params)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("interleave", [False, True])
def test_full_rank_mqa_conversion_reproduces_the_logits(arch, interleave, lossless_mla):
    model = tiny_model(arch, num_key_value_heads=1)
    ids = tokens(100)  # past the 64 trained positions
    before = logits(model, ids)
    record = full_rank(model, interleave=interleave)
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    assert model.config.rope_interleave is interleave
    torch.testing.assert_close(logits(model, ids), before, **TOLERANCE)
    assert record.kv_bytes_per_token_before == 2 * 2 * 1 * D * 4  # 2 layers, k and v, 1 head, fp32
    assert record.kv_bytes_per_token_after == 2 * (D + 1 + D) * 4
    assert record.details["latent_norm_deviation"] is None  # svd: no calibration text to measure on


def test_full_rank_conversion_of_a_yarn_model_keeps_its_scaling(lossless_mla):
    model = tiny_model("llama", num_key_value_heads=1)
    surgery.apply(model, "yarn", factor=4)
    ids = tokens(200)
    before = logits(model, ids)
    full_rank(model)
    assert model.config.rope_parameters["rope_type"] == "yarn" and model.config.rope_parameters["factor"] == 4
    assert model.model.rotary_emb.attention_scaling == pytest.approx(1 + 0.1 * torch.log(torch.tensor(4.0)).item())
    torch.testing.assert_close(logits(model, ids), before, **TOLERANCE)


@pytest.mark.parametrize(
    "rope",
    [
        {},
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ],
)
def test_partial_rope_keeps_the_source_highest_frequencies(rope):
    """Stock DeepseekV3 builds its frequencies from rope_theta over qk_rope_head_dim; the converted
    model's must be the source's r/2 highest ones, recomputed independently here."""
    overrides = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, **rope}} if rope else {}
    model = tiny_model("llama", **overrides)
    source = model.model.rotary_emb.inv_freq.clone()
    surgery.apply(model, "mla", kv_rank=24, rope_dim=8, method="svd")
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, source[:4], rtol=1e-6, atol=0)
    assert model.config.rope_parameters["rope_theta"] == pytest.approx(10000.0 ** (8 / D))


def test_checkpoint_loads_in_stock_transformers_without_surgery_and_generates(tmp_path):
    model = tiny_model("llama", num_key_value_heads=2)
    surgery.apply(
        model, "mla", kv_rank=12, rope_dim=8, method="calibrated", tokenizer=char_tokenizer(), calibration_tokens=256
    )
    surgery.save(model, None, tmp_path / "mla")
    ids = tokens(40)
    torch.save(ids, tmp_path / "ids.pt")
    child = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, StaticCache
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "mla")!r}).eval()
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        with torch.no_grad():
            out = {{"logits": model(ids).logits}}
        prompt = ids[:, :8]
        out["dynamic"] = model.generate(prompt, max_new_tokens=8, do_sample=False)
        cache = StaticCache(config=model.config, max_cache_len=32)
        out["static"] = model.generate(prompt, max_new_tokens=8, do_sample=False, past_key_values=cache)
        out["class"] = type(model).__name__
        out["surgery_imported"] = any(m == "surgery" or m.startswith("surgery.") for m in sys.modules)
        torch.save(out, {str(tmp_path / "out.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", child], check=True, cwd=tmp_path, timeout=300)
    out = torch.load(tmp_path / "out.pt")
    assert out["class"] == "DeepseekV3ForCausalLM" and not out["surgery_imported"]
    assert torch.equal(out["logits"], logits(model, ids))
    generated = model.generate(ids[:, :8], max_new_tokens=8, do_sample=False)
    assert torch.equal(out["dynamic"], generated) and torch.equal(out["static"], generated)
    config = json.loads((tmp_path / "mla" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and "auto_map" not in config
    assert config["q_lora_rank"] is None and config["first_k_dense_replace"] == config["num_hidden_layers"]
    assert config["surgery"][-1]["name"] == "mla"


def test_the_cache_holds_the_latent_and_shrinks_by_the_formula():
    model = tiny_model("llama", num_key_value_heads=2)
    prompt = tokens(20)
    settings = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    original = DynamicCache(config=model.config)
    model.generate(prompt, past_key_values=original, **settings)
    surgery.apply(model, "mla", kv_rank=12, rope_dim=4, method="svd")
    cache = DynamicCache(config=model.config)
    model.generate(prompt, past_key_values=cache, **settings)
    held = 29  # 20 prompt tokens and 9 fed back (the 10th is never cached)
    assert cache_bytes(cache) == 2 * held * (12 + 4) * 4  # layers x tokens x (latent + rope) x fp32
    assert cache_bytes(cache) == kv_cache_bytes(model.config, held, 4)
    assert cache_bytes(original) == 2 * held * 2 * 2 * D * 4
    assert cache_bytes(cache) / cache_bytes(original) == pytest.approx((12 + 4) / (2 * 2 * D))


def divergence(student, teacher, ids: torch.Tensor) -> float:
    """Mean KL(teacher || student) per token."""
    with torch.no_grad():
        p = F.log_softmax(teacher(ids).logits.float(), -1)
        q = F.log_softmax(student(ids).logits.float(), -1)
    return F.kl_div(q, p, log_target=True, reduction="sum").item() / ids[..., :].numel()


def text_ids(split: str, n: int = 4, length: int = 128) -> torch.Tensor:
    from surgery.data import token_blocks

    return token_blocks(char_tokenizer(), "pydoc", length, split=split)[:n]


def test_lower_rank_diverges_more_on_calibration_text():
    original = tiny_model("llama", num_key_value_heads=2)
    ids = text_ids("train")
    kl = []
    for rank in (4, 8, 16, 32, 49):
        model = tiny_model("llama", num_key_value_heads=2)
        surgery.apply(model, "mla", kv_rank=rank, rope_dim=8, tokenizer=char_tokenizer(), calibration_tokens=1024)
        kl.append(divergence(model, original, ids))
    assert kl == sorted(kl, reverse=True) and kl[0] > 4 * kl[-1], kl


def test_fitted_beats_svd_at_equal_rank_on_held_out_text():
    original = tiny_model("llama", num_key_value_heads=2)
    held_out = text_ids("heldout")
    kl = {}
    for method, extra in (("svd", {}), ("fitted", {"calibration_tokens": 1024, "fit_tokens": 1024, "fit_steps": 30})):
        model = tiny_model("llama", num_key_value_heads=2)
        surgery.apply(model, "mla", kv_rank=8, rope_dim=8, method=method, tokenizer=char_tokenizer(), **extra)
        kl[method] = divergence(model, original, held_out)
    assert kl["fitted"] < 0.8 * kl["svd"], kl


@pytest.mark.parametrize(
    "arch, overrides, params, match",
    [
        ("qwen2", {}, {}, "q/k/v projections have biases"),
        ("qwen3", {}, {}, "q_norm/k_norm"),
        ("mistral", {"sliding_window": 16}, {}, "no sliding window"),
        ("llama", {"attention_bias": True}, {}, "biases"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
            {},
            "only rope_dim 16",
        ),
        ("llama", {}, {"rope_dim": 32}, "exceeds the head dim 16"),
        ("gemma3", {}, {}, "supports model types"),
    ],
)
def test_refusals_name_what_blocks_the_conversion(arch, overrides, params, match):
    model = tiny_model(arch, **overrides)
    with pytest.raises(UnsupportedModel, match=match):
        surgery.apply(model, "mla", **{"kv_rank": 16, "method": "svd", **params})
    assert type(model).__name__ != "DeepseekV3ForCausalLM"


def test_an_odd_rope_dim_is_invalid():
    with pytest.raises(InvalidParams, match="rope_dim must be even"):
        surgery.make_patch("mla", kv_rank=16, rope_dim=7)


def test_a_converted_model_refuses_further_attention_patches_in_one_line(tmp_path):
    model = tiny_model("llama")
    surgery.apply(model, "mla", kv_rank=16, rope_dim=8, method="svd")
    for name, params in (("kv-quant", {"bits": 4}), ("yarn", {"factor": 2}), ("mla", {"kv_rank": 8}), ("mqa", {})):
        with pytest.raises(UnsupportedModel, match="supports model types .*; got 'deepseek_v3'"):
            surgery.apply(model, name, **params)
    surgery.save(model, None, tmp_path / "mla")
    result = CliRunner().invoke(
        main, ["apply", "kv-quant", "--bits", "4", str(tmp_path / "mla"), "-o", str(tmp_path / "again")]
    )
    assert result.exit_code == 2, result.output
    assert "got 'deepseek_v3'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "again").exists()


def test_inspect_prices_the_latent(tmp_path):
    model = tiny_model("llama")
    surgery.apply(model, "mla", kv_rank=12, rope_dim=4, method="svd")
    surgery.save(model, None, tmp_path / "mla")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "mla"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["attention"] == "MLA" and (info["latent"], info["rope_key"]) == (12, 4)
    assert info["kv_bytes_per_token"] == 2 * (12 + 4) * 4  # float32 config dtype


def test_the_speed_eval_measures_the_latent_cache_at_the_formula():
    from surgery.evaluate import make_eval

    model = tiny_model("llama")
    surgery.apply(model, "mla", kv_rank=12, rope_dim=4, method="svd")
    result = make_eval("speed", context=100, decode=4, batch=2).run(model, char_tokenizer())
    assert result.metrics["speed.kv_bytes_ratio"] == 1.0
    assert result.metrics["speed.kv_bytes@104"] == 2 * 104 * 2 * (12 + 4) * 4  # batch, tokens, layers, values


def test_the_heal_recipe_dry_runs_on_the_embedded_config():
    result = CliRunner().invoke(main, ["validate", "recipes/smollm2-mla-heal.yaml", "--model", "smollm2"])
    assert result.exit_code == 0, result.output
    assert "KV cache x0.333" in result.output and "rope_theta 316.228" in result.output


def test_a_quantized_cache_set_up_before_the_conversion_is_refused_not_dropped():
    model = tiny_model("llama")
    surgery.apply(model, "kv-quant", bits=4, residual=16, group_size=8)
    with pytest.raises(UnsupportedModel, match="carries kv-quant.*apply mla first"):
        surgery.apply(model, "mla", kv_rank=16, method="svd")
    assert type(model).__name__ == "LlamaForCausalLM"


def test_the_scale_norm_writes_no_bias_and_reloads(tmp_path, lossless_mla):
    """latent_norm=scale: the layout vLLM and SGLang build (no kv_a or o_proj bias); the norm's
    per-token scale is measured on calibration text, and the checkpoint reloads to the same logits."""
    from safetensors import safe_open

    model = tiny_model("llama", num_key_value_heads=1)
    record = surgery.apply(
        model, "mla", kv_rank=D, rope_dim=D, latent_norm="scale", tokenizer=char_tokenizer(), calibration_tokens=256
    )
    deviation = record.details["latent_norm_deviation"]
    assert 0 < deviation["mean"] <= deviation["max"]  # per-token RMS varies: approximate, measured
    surgery.save(model, None, tmp_path / "mla")
    assert json.loads((tmp_path / "mla" / "config.json").read_text())["attention_bias"] is False
    with safe_open(tmp_path / "mla" / "model.safetensors", "pt") as f:
        assert not [name for name in f.keys() if name.endswith(".bias")]
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "mla").eval()
    ids = tokens(40)
    assert torch.equal(logits(stock, ids), logits(model, ids))


def test_a_latent_as_wide_as_the_cache_it_replaces_is_refused():
    """The cache must shrink: latent + RoPE key at or above 2 x kv heads x head dim is refused
    before anything changes (a rank of 100000 once ran minutes and wrote 17 GB)."""
    model = tiny_model("llama")  # 2 kv heads x 16: 64 values per token and layer
    before = logits(model, tokens(20))
    for rank, rope in ((56, 8), (100, 8), (48, 16)):
        with pytest.raises(UnsupportedModel, match=f"not below the 64 the model caches now.*below {64 - rope}"):
            surgery.apply(model, "mla", kv_rank=rank, rope_dim=rope, method="svd")
    assert type(model).__name__ == "LlamaForCausalLM" and torch.equal(logits(model, tokens(20)), before)
    surgery.apply(model, "mla", kv_rank=55, rope_dim=8, method="svd")  # 63 < 64: allowed
