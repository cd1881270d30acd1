"""gqa / mqa: exactness of pooling, of the alignment rotations, KV bytes, and errors."""

from __future__ import annotations

import re

import pytest
import torch

import surgery
from surgery.data import token_blocks
from surgery.errors import UnsupportedModel
from surgery.evaluate import make_eval
from surgery.evaluate.cache import cache_bytes
from surgery.info import inspect
from surgery.patches.gqa import attention_modules, pool_heads, rebuild
from surgery.patches.gqa_align import merge_heads, rotated_heads
from tests.conftest import char_tokenizer, logits, tiny_model, tokens


def test_pool_heads_averages_consecutive_heads():
    w = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(8, 3)  # 4 heads of dim 2
    pooled = pool_heads(w, group=2, dim=2)
    torch.testing.assert_close(
        pooled, torch.stack([(w[0] + w[2]) / 2, (w[1] + w[3]) / 2, (w[4] + w[6]) / 2, (w[5] + w[7]) / 2])
    )


def test_pooling_to_the_current_count_is_the_identity(arch):
    model = tiny_model(arch)
    ids = tokens(40)
    before = logits(model, ids)
    surgery.apply(model, "gqa", num_kv_heads=2)
    assert torch.equal(logits(model, ids), before)


def expand_to_mha(model):
    """Repeat every kv head for each query head that reads it: an exact MHA copy of a GQA model."""
    config = model.config
    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // n_q
    modules = attention_modules(model)
    states = {}
    for name, module in modules:
        state = dict(module.state_dict())
        for key in [k for k in state if k.startswith(("k_proj", "v_proj"))]:
            t = state[key]
            state[key] = (
                t.reshape(n_kv, dim, *t.shape[1:]).repeat_interleave(n_q // n_kv, 0).reshape(n_q * dim, *t.shape[1:])
            )
        states[name] = state
    config.num_key_value_heads = n_q
    for name, module in modules:
        rebuild(model, name, module, states[name])
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_expanded_then_pooled_back_gives_the_original_logits(arch):
    model = tiny_model(arch)
    ids = tokens(40)
    original = logits(model, ids)
    expand_to_mha(model)
    assert model.config.num_key_value_heads == 4
    torch.testing.assert_close(logits(model, ids), original, rtol=1e-5, atol=1e-5)
    runs = {  # aligning or fitting identical heads must change nothing
        "mean": {},
        "aligned": {"calibration_tokens": 64},
        "fitted": {"calibration_tokens": 64, "fit_tokens": 128},
    }
    for method, params in runs.items():
        copy = tiny_model(arch)
        expand_to_mha(copy)
        surgery.apply(copy, "gqa", tokenizer=char_tokenizer(), num_kv_heads=2, method=method, **params)
        torch.testing.assert_close(logits(copy, ids), original, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "qwen3"])
def test_alignment_rotations_preserve_the_function(arch):
    model = tiny_model(arch, num_key_value_heads=4)  # MHA: 4 kv heads
    ids = tokens(60)
    before = logits(model, ids)
    patch = surgery.make_patch("gqa", num_kv_heads=1, method="aligned", calibration_tokens=64)
    modules = attention_modules(model)
    states = {
        name: merge_heads(heads) for name, heads in rotated_heads(model, modules, patch, char_tokenizer()).items()
    }
    assert not torch.equal(states[modules[0][0]]["o_proj.weight"], modules[0][1].state_dict()["o_proj.weight"])
    for name, module in modules:
        module.load_state_dict(states[name])
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma3"])
def test_kv_cache_bytes_shrink_by_the_pooling_factor(arch):
    model = tiny_model(arch, num_key_value_heads=4, max_position_embeddings=256)
    prompt = tokens(20)

    def generated_bytes(m):
        out = m.generate(prompt, max_new_tokens=30, min_new_tokens=30, do_sample=False, return_dict_in_generate=True)
        return cache_bytes(out.cache)

    full = generated_bytes(model)
    predicted = inspect(model.config, contexts=(50,), kv_dtype="fp32").kv_cache[0].bytes
    surgery.apply(model, "mqa")
    pooled = generated_bytes(model)
    assert full == 4 * pooled
    assert inspect(model.config, contexts=(50,), kv_dtype="fp32").kv_cache[0].bytes * 4 == predicted


def test_output_weighted_pool_is_exact_for_identical_heads_and_differs_from_mean():
    from surgery.patches.gqa_align import output_weighted_pool

    torch.manual_seed(0)
    v = torch.randn(1, 4, 8).repeat(2, 1, 1)  # two identical value heads of dim 4
    o = torch.randn(8, 4, 4)  # hidden 8, 4 query heads of dim 4 (2 per kv head)
    pooled, _ = output_weighted_pool(v, None, o, group=2, per_kv=2)
    torch.testing.assert_close(pooled[0], v[0], rtol=1e-4, atol=1e-5)
    distinct = torch.randn(2, 4, 8)
    weighted, _ = output_weighted_pool(distinct, None, o, group=2, per_kv=2)
    assert not torch.allclose(weighted[0], distinct.mean(0), atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma3"])
def test_fitting_brings_the_pooled_model_closer_to_the_original(arch):
    ids = token_blocks(char_tokenizer(), "pydoc", 64, split="heldout")[:4]  # the fit reads the train split
    original = logits(tiny_model(arch, num_key_value_heads=4), ids)
    errors, notes = {}, {}
    fit = {"fit_tokens": 1024, "fit_steps": 100, "fit_lr": 3e-3}
    for method, params in {"aligned": {}, "fitted": fit}.items():
        pooled = tiny_model(arch, num_key_value_heads=4)
        record = surgery.apply(pooled, "gqa", tokenizer=char_tokenizer(), num_kv_heads=1, method=method, **params)
        errors[method] = (logits(pooled, ids) - original).pow(2).mean().item()
        notes[method] = record.notes
    before, after = map(float, re.search(r"error ([\d.]+) -> ([\d.]+)", notes["fitted"][-1]).groups())
    assert after < 0.3 * before, notes["fitted"]  # each layer's attention output, on the calibration text
    assert errors["fitted"] < 0.7 * errors["aligned"], errors  # the logits, on held-out text


def test_the_fit_window_is_a_parameter_capped_by_the_context_and_recorded():
    from surgery.patches.gqa_fit import calibration_ids

    model, tok = tiny_model("llama", num_key_value_heads=4), char_tokenizer()
    assert calibration_ids(model, tok, "pydoc", 256, 32).shape == (8, 32)
    assert calibration_ids(model, tok, "pydoc", 1024, 4096).shape == (16, 64)  # the tiny model's context is 64
    with pytest.raises(surgery.SurgeryError, match="fit_seq_len applies to method fitted, not mean"):
        surgery.apply(model, "gqa", num_kv_heads=1, fit_seq_len=32)
    params = {"method": "fitted", "fit_tokens": 128, "fit_steps": 2, "fit_seq_len": 32}
    record = surgery.apply(model, "gqa", tokenizer=tok, num_kv_heads=1, **params)
    assert "on 128 calibration tokens" in record.notes[-1], record.notes
    assert model.config.surgery[-1]["params"]["fit_seq_len"] == 32


def test_fitting_a_bfloat16_model_trains_in_float32_and_keeps_its_dtype():
    model = tiny_model("llama", num_key_value_heads=4).to(torch.bfloat16)
    frozen = {n for n, p in model.named_parameters() if "embed" in n}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    record = surgery.apply(
        model, "gqa", tokenizer=char_tokenizer(), num_kv_heads=1, method="fitted", fit_tokens=256, fit_steps=20
    )
    before, after = map(float, re.search(r"error ([\d.]+) -> ([\d.]+)", record.notes[-1]).groups())
    assert after < before
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen  # flags restored
    assert torch.isfinite(logits(model, tokens(20)).float()).all()


def test_non_divisor_is_refused_with_the_possible_counts():
    with pytest.raises(UnsupportedModel, match="3 kv heads cannot pool the model's 4; possible: 1, 2, 4"):
        surgery.apply(tiny_model("llama", num_key_value_heads=4), "gqa", num_kv_heads=3)


def test_aligned_needs_a_tokenizer():
    with pytest.raises(surgery.SurgeryError, match="needs the model's tokenizer"):
        surgery.apply(tiny_model("llama"), "gqa", num_kv_heads=1, method="aligned")


@pytest.mark.heavy
def test_data_aware_pooling_beats_mean_on_the_embedded_model():
    ppl = make_eval("perplexity", lengths=[1024])  # held-out; calibration reads the train split
    runs = {
        "mean": {"method": "mean"},
        "aligned": {"method": "aligned", "calibration_tokens": 512},
        "fitted": {"method": "fitted", "calibration_tokens": 512, "fit_tokens": 2048, "fit_steps": 20},
    }
    scores = {}
    for label, params in runs.items():
        model, tokenizer = surgery.load_model("smollm2", dtype="float32")
        surgery.apply(model, "gqa", tokenizer=tokenizer, num_kv_heads=1, **params)
        scores[label] = ppl.run(model, tokenizer).metrics["perplexity.ppl@1024"]
    assert scores["mean"] > 1000  # 3 -> 1 by plain averaging is destructive
    assert scores["aligned"] < scores["mean"] / 10, scores
    assert scores["fitted"] < scores["aligned"] / 2, scores
