"""kv-quant: packing and quantization bounds, the KIVI layer's bookkeeping (residual, flushes,
beam reordering), automatic use by generate() and the evaluators, persistence and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import surgery
from surgery.errors import InvalidParams, UnsupportedModel
from surgery.evaluate.cache import cache_bytes, make_cache
from surgery.patch import make_patch
from surgery.patches.kivi import KIVILayer, dequantize, pack, quantize, unpack
from tests.conftest import tiny_model, tokens


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_round_trips_and_shrinks(bits):
    codes = torch.randint(0, 2**bits, (2, 3, 5, 16), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == 16 * bits // 8
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("per_channel", [True, False])
def test_quantization_error_is_at_most_half_a_step(bits, per_channel):
    x = torch.randn(2, 3, 32, 16) * torch.linspace(0.1, 10, 16)  # outlier channels, as keys have
    q = quantize(x, bits, 8, per_channel)
    back = dequantize(q, bits, 8, per_channel, torch.float32)
    scale = q[1].float().unsqueeze(3 if per_channel else 4)
    grouped_err = (back - x).abs().view(2, 3, 4, 8, 16) if per_channel else (back - x).abs().view(2, 3, 32, 2, 8)
    assert (grouped_err <= scale / 2 + 1e-2 * scale + 1e-3).all()  # half a step (+ fp16 rounding of lo)
    # per-channel keys: each channel's range is its own, so a quiet channel stays accurate
    if per_channel:
        assert (back - x)[..., 0].abs().max() < (back - x)[..., -1].abs().max() / 10


def test_layer_keeps_a_residual_and_flushes_whole_blocks():
    layer = KIVILayer(bits=4, group_size=8, residual=16)
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    keys, values = layer.update(k, v)
    assert torch.equal(keys, k) and torch.equal(values, v)  # prefill attends to exact states
    assert layer._quantized_keys[0].shape == (1, 2, 32, 8) and layer.keys.shape[-2] == 8  # 40 = 2 blocks + 8
    assert layer.get_seq_length() == 40
    k2, v2 = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    keys, values = layer.update(k2, v2)
    assert keys.shape[-2] == 41
    assert torch.equal(keys[..., 32:40, :], k[..., 32:, :]) and torch.equal(keys[..., 40:, :], k2)  # residual exact
    err = (keys[..., :32, :] - k[..., :32, :]).abs().max()
    assert 0 < err < 0.5
    for _ in range(7):  # residual reaches 16: flushed
        layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    assert layer._quantized_keys[0].shape[-2] == 48 and layer.keys.shape[-2] == 0


def test_reorder_and_repeat_are_exact():
    layer = KIVILayer(bits=2, group_size=4, residual=8)
    layer.update(torch.randn(3, 1, 10, 8), torch.randn(3, 1, 10, 8))
    probe = torch.zeros(3, 1, 1, 8)
    before, _ = layer.update(probe, probe)
    layer.reorder_cache(torch.tensor([2, 0, 0]))
    after, _ = layer.update(probe, probe)
    assert torch.equal(after[:, :, :11], before[[2, 0, 0]])
    layer.batch_repeat_interleave(2)
    assert layer.update(probe[:1].repeat(6, 1, 1, 1), probe[:1].repeat(6, 1, 1, 1))[0].shape[0] == 6


@torch.no_grad()
def chunked_logits(model, ids, chunk=8):
    cache, out = make_cache(model), []
    for start in range(0, ids.shape[1], chunk):
        out.append(model(ids[:, start : start + chunk], cache=cache, use_cache=True).logits)
    return torch.cat(out, 1), cache


def test_evaluator_cache_quantizes_and_error_grows_as_bits_drop():
    ids = tokens(48)
    base = tiny_model("llama")
    exact, dynamic = chunked_logits(base, ids)
    assert isinstance(dynamic, DynamicCache)
    errors, sizes = {}, {}
    for bits in (8, 4, 2):
        model = tiny_model("llama")
        make_patch("kv-quant", bits=bits, residual=8, group_size=8).apply(model)
        got, cache = chunked_logits(model, ids)
        assert isinstance(cache.layers[0], KIVILayer)
        errors[bits] = (got - exact).abs().max().item()
        sizes[bits] = cache_bytes(cache)
    assert 0 < errors[8] < errors[4] < errors[2]
    assert errors[8] < 0.02
    assert sizes[2] < sizes[4] < sizes[8] < cache_bytes(dynamic)


def test_generate_uses_the_cache_without_being_asked(tmp_path):
    model = tiny_model("llama")
    make_patch("kv-quant", bits=4, residual=8, group_size=8).apply(model)
    out = model.generate(tokens(20), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache.layers[0], KIVILayer)
    assert out.cache.layers[0]._quantized_keys[0].shape[-2] == 16
    beams = model.generate(tokens(20), max_new_tokens=6, num_beams=3, do_sample=False)
    assert beams.shape == (1, 26)
    explicit = model.generate(tokens(20), max_new_tokens=4, do_sample=False, cache_implementation="dynamic")
    assert explicit.shape == (1, 24)  # an explicit choice wins over the patch

    surgery.save(model, None, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert "cache_implementation" not in saved  # stock transformers runs a normal cache
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    stock_out = stock.generate(tokens(20), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert isinstance(stock_out.cache, DynamicCache) and not isinstance(stock_out.cache.layers[0], KIVILayer)
    loaded, _ = surgery.load_model(str(tmp_path / "out"))
    again = loaded.generate(tokens(20), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert isinstance(again.cache.layers[0], KIVILayer)
    assert torch.equal(again.sequences, out.sequences)


def test_fp8_persists_in_generation_config(tmp_path):
    model = tiny_model("qwen2")
    make_patch("kv-quant", method="fp8").apply(model)
    surgery.save(model, None, tmp_path / "out")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert stock.generation_config.cache_implementation == "quantized"
    assert type(make_cache(stock).layers[0]).__name__ == "Fp8QuantizedLayer"
    out = stock.generate(tokens(12), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert type(out.cache.layers[0]).__name__ == "Fp8QuantizedLayer"


@pytest.mark.parametrize(
    ("arch", "overrides", "params", "message"),
    [
        ("gemma3", {}, {"bits": 4}, "supports model types"),
        ("mistral", {"sliding_window": 16}, {"bits": 4}, "sliding-window layers"),
        ("llama", {}, {"bits": 4, "group_size": 12, "residual": 24}, "must divide the head dimension 16"),
    ],
)
def test_refusals(arch, overrides, params, message):
    with pytest.raises(UnsupportedModel, match=message):
        make_patch("kv-quant", **params).apply(tiny_model(arch, **overrides))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"method": "fp8", "bits": 4}, "fp8 stores 8 bits"),
        ({"method": "fp8", "residual": 64}, "apply to method int only"),
        ({"bits": 4, "residual": 100, "group_size": 64}, "multiple of group_size"),
        ({"bits": 3}, "bits"),
    ],
)
def test_bad_parameters(params, message):
    with pytest.raises(InvalidParams, match=message):
        make_patch("kv-quant", **params)
