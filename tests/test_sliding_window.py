"""sliding-window equals an explicit banded causal mask: forward (left-padded batch), generate with
the dynamic cache and with the static cache, uniform and hybrid, on every supported architecture;
and it persists (natively or through load_model) without the broken Llama state."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import surgery
from surgery.arch import layer_windows
from surgery.errors import InvalidParams, UnsupportedModel
from surgery.patch import make_patch
from surgery.patches.sliding_window import RUNTIME_IMPL, band
from tests.conftest import tiny_model, tokens

WINDOW = 5
REFERENCE = "test_explicit_band"
REFERENCE_MASKS: dict[int, torch.Tensor] = {}


def reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Plain softmax attention with the explicit per-layer mask in REFERENCE_MASKS (the model's
    own mask is ignored). No cache: queries and keys cover the whole sequence."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    allowed = REFERENCE_MASKS[module.layer_idx]
    scores = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num()
    return (scores @ value).transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE, reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


def explicit_masks(padding: torch.Tensor, windows: list[int | None]) -> dict[int, torch.Tensor]:
    """Key j visible to query i iff j <= i, i - j < window, and j is not padding (loops, no tricks)."""
    batch, length = padding.shape
    out = {}
    for layer, window in enumerate(windows):
        allowed = torch.zeros(batch, 1, length, length, dtype=torch.bool)
        for b in range(batch):
            for i in range(length):
                for j in range(i + 1):
                    if padding[b, j] and (window is None or i - j < window):
                        allowed[b, 0, i, j] = True
        out[layer] = allowed
    return out


@torch.no_grad()
def reference_logits(model, ids, padding, windows):
    REFERENCE_MASKS.clear()
    REFERENCE_MASKS.update(explicit_masks(padding, windows))
    positions = (padding.cumsum(-1) - 1).clamp(min=0)
    return model(ids, attention_mask=padding, position_ids=positions).logits


@torch.no_grad()
def reference_generate(model, ids, padding, windows, new_tokens):
    for _ in range(new_tokens):
        nxt = reference_logits(model, ids, padding, windows)[:, -1].argmax(-1, keepdim=True)
        ids, padding = torch.cat([ids, nxt], 1), torch.cat([padding, torch.ones_like(nxt)], 1)
    return ids


def left_padded(batch: int = 3, length: int = 14) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokens(length, batch=batch, seed=3)
    padding = torch.ones_like(ids)
    for b in range(1, batch):  # row b has 2*b pad tokens on the left
        padding[b, : 2 * b] = 0
        ids[b, : 2 * b] = 0
    return ids, padding


CASES = {
    # arch, params, expected route/persist
    "llama-uniform": ("llama", {"window": WINDOW}, "config"),
    "llama-hybrid": ("llama", {"window": WINDOW, "global_every": 2}, "runtime"),
    "llama-biased": ("llama", {"window": WINDOW}, "runtime"),
    "mistral-uniform": ("mistral", {"window": WINDOW}, "config"),
    "mistral-hybrid": ("mistral", {"window": WINDOW, "layers": [1]}, "runtime"),
    "qwen2-uniform": ("qwen2", {"window": WINDOW}, "config"),
    "qwen2-hybrid": ("qwen2", {"window": WINDOW, "layers": [0]}, "config"),
    "gemma3-native": ("gemma3", {"window": WINDOW}, "config"),  # keeps its pattern: layer 0 slides
    "gemma3-uniform": ("gemma3", {"window": WINDOW, "layers": [0, 1]}, "config"),
    "gemma3-hybrid": ("gemma3", {"window": WINDOW, "layers": [1]}, "config"),
}


def case_model(case: str):
    arch, params, _ = CASES[case]
    overrides = {"num_hidden_layers": 3} if arch != "gemma3" else {}
    if case == "llama-biased":
        overrides["attention_bias"] = True
    if case in ("gemma3-uniform", "gemma3-hybrid"):  # the same RoPE on both layer types
        overrides["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
    model = tiny_model(arch, **overrides)
    model.set_attn_implementation("sdpa")
    return model, make_patch("sliding-window", **params)


@pytest.fixture(params=sorted(CASES))
def case(request) -> str:
    return request.param


def test_band_keeps_the_last_window_keys_of_each_query():
    causal = torch.ones(4, 6, dtype=torch.bool).tril(2)[None, None]  # 4 queries at positions 2..5
    assert band(causal, 2)[0, 0].int().tolist() == [
        [0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1, 1],
    ]


def test_forward_and_generation_equal_the_explicit_band(case):
    model, patch = case_model(case)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation(REFERENCE)
    record = patch.apply(model)
    assert record.persist == CASES[case][2]
    windows = patch.expected_windows(model.config)
    assert any(w is None for w in windows) == ("uniform" not in case and "biased" not in case)

    ids, padding = left_padded()
    expected = reference_logits(reference, ids, padding, windows)
    positions = (padding.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(ids, attention_mask=padding, position_ids=positions).logits
    real = padding.bool()
    assert (got - expected)[real].abs().max() < 1e-5
    # the band matters on these inputs: full attention differs
    assert (reference_logits(reference, ids, padding, [None] * len(windows)) - expected)[real].abs().max() > 1e-3

    want = reference_generate(reference, ids, padding, windows, new_tokens=10)
    for cache in ("dynamic", "static"):
        out = model.generate(
            ids,
            attention_mask=padding,
            max_new_tokens=10,
            do_sample=False,
            cache_implementation=cache,
            pad_token_id=0,
        )
        assert torch.equal(out, want), cache


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_window_covering_the_sequence_is_full_attention(arch):
    model = tiny_model(arch)
    ids = tokens(16, batch=2)  # the tiny Gemma3's own window is 16: full attention on 16 tokens
    with torch.no_grad():
        before = model(ids).logits
    make_patch("sliding-window", window=16).apply(model)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-6, rtol=0)


def test_llama_becomes_mistral_and_reloads_in_stock_transformers(tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)
    held = model
    make_patch("sliding-window", window=WINDOW).apply(model)
    assert type(held).__name__ == "MistralForCausalLM" and held is model
    assert not hasattr(model.config, "attention_bias") and model.config.sliding_window == WINDOW
    ids = tokens(16)
    with torch.no_grad():
        want = model(ids).logits
    surgery.save(model, None, tmp_path / "out")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(stock).__name__ == "MistralForCausalLM" and stock.config.sliding_window == WINDOW
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, want, atol=1e-6)


def test_runtime_route_is_restored_by_load_model(tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)
    make_patch("sliding-window", window=WINDOW, global_every=3).apply(model)
    assert not hasattr(model.config, "sliding_window") or model.config.sliding_window is None
    ids = tokens(16)
    with torch.no_grad():
        want = model(ids).logits
    surgery.save(model, None, tmp_path / "out")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # full attention: runtime patch not there
    assert stock.config._attn_implementation != RUNTIME_IMPL
    loaded, _ = surgery.load_model(str(tmp_path / "out"))
    assert loaded.config._attn_implementation == RUNTIME_IMPL
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, want, atol=1e-6)
        assert not torch.allclose(stock(ids).logits, want, atol=1e-3)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma3"])
def test_native_layer_types_persist(arch, tmp_path):
    model = tiny_model(arch)
    make_patch("sliding-window", window=WINDOW, layers=[0]).apply(model)
    assert layer_windows(model.config) == [WINDOW, None]
    ids = tokens(16)
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert layer_windows(stock.config) == [WINDOW, None]
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, want, atol=1e-6)


def test_kv_cache_keeps_window_tokens_on_native_routes():
    model = tiny_model("mistral", num_hidden_layers=3)
    make_patch("sliding-window", window=WINDOW).apply(model)
    out = model.generate(tokens(12), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert {layer.keys.shape[-2] for layer in out.cache.layers} == {WINDOW - 1}
    assert model.config.surgery[-1]["kv_bytes_per_token_after"] == model.config.surgery[-1]["kv_bytes_per_token_before"]


@pytest.mark.parametrize(
    ("arch", "params", "message"),
    [
        ("gemma3", {"window": 4, "global_every": 3}, "Gemma3 ties RoPE to the layer type"),
        ("llama", {"window": 4, "layers": [7]}, "layer 7 does not exist"),
        ("phi3", {"window": 4}, "supports model types"),
    ],
)
def test_refusals(arch, params, message):
    with pytest.raises(UnsupportedModel, match=message):
        make_patch("sliding-window", **params).apply(tiny_model(arch))


def test_runtime_route_refuses_flex_and_attention_after_it():
    model = tiny_model("llama")
    model.set_attn_implementation("flex_attention")
    with pytest.raises(UnsupportedModel, match="apply it before switching the backend"):
        make_patch("sliding-window", window=4, layers=[0]).apply(model)
    model.set_attn_implementation("sdpa")
    make_patch("sliding-window", window=4, layers=[0]).apply(model)
    with pytest.raises(UnsupportedModel, match="sliding-window"):
        make_patch("attention", impl="eager").apply(model)
    with pytest.raises(UnsupportedModel, match="already applied"):
        make_patch("sliding-window", window=4).apply(model)


def test_bad_parameters():
    with pytest.raises(InvalidParams, match="either global_every or layers"):
        make_patch("sliding-window", window=4, global_every=2, layers=[0])
    with pytest.raises(InvalidParams, match="window"):
        make_patch("sliding-window", window=0)
