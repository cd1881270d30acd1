"""RoPE patches against independent implementations of the published formulas, on every
architecture, plus persistence through a stock reload and re-scaling from the origin."""

from __future__ import annotations

import math

import pytest
import torch

import surgery
from surgery.errors import InvalidParams, PatchDidNotTakeEffect, UnsupportedModel
from tests.conftest import logits, tiny_model, tokens

ROPE = ["yarn", "linear", "ntk", "dynamic-ntk", "llama3"]
L0 = 64  # tiny models' pretraining length


# ----------------------------------------------------------------- the formulas, written from the papers


def base_inv_freq(theta: float, d: int) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)


def linear_formula(theta, d, s, L):
    return base_inv_freq(theta, d) / s, 1.0


def ntk_formula(theta, d, s, L):  # static NTK-aware: theta' = theta * s^(d/(d-2))
    return base_inv_freq(theta * s ** (d / (d - 2)), d), 1.0


def yarn_formula(theta, d, s, L, beta_fast=32.0, beta_slow=1.0):
    """YaRN reference: dimensions rotating more than beta_fast times over L are kept, fewer than
    beta_slow are interpolated by s, with a linear ramp between; temperature 0.1 ln s + 1."""
    inv = base_inv_freq(theta, d)

    def dim_for(rotations):  # dimension index whose wavelength fits `rotations` times in L
        return d * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(dim_for(beta_fast)), 0), min(math.ceil(dim_for(beta_slow)), d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    return inv / s * (1 - keep) + inv * keep, 0.1 * math.log(s) + 1.0 if s > 1 else 1.0


def llama3_formula(theta, d, s, L, low=1.0, high=4.0):
    out = []
    for f in base_inv_freq(theta, d).tolist():
        wavelen = 2 * math.pi / f
        if wavelen < L / high:
            out.append(f)
        elif wavelen > L / low:
            out.append(f / s)
        else:
            smooth = (L / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / s + smooth * f)
    return torch.tensor(out, dtype=torch.float64), 1.0


def dynamic_formula(theta, d, s, L, T):
    return base_inv_freq(theta * ((s * T / L) - (s - 1)) ** (d / (d - 2)), d)


FORMULAS = {"yarn": yarn_formula, "linear": linear_formula, "ntk": ntk_formula, "llama3": llama3_formula}


def rotary(model):
    return model.model.rotary_emb


def rope_slot(model):
    """(buffer prefix, theta, rotary dim) of the layers a default patch rescales."""
    config = model.config
    d = (
        int(
            (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
            * config.rope_parameters.get("partial_rotary_factor", 1.0)
        )
        if "rope_type" in config.rope_parameters
        else config.head_dim
    )
    if "full_attention" in config.rope_parameters:
        return "full_attention_", config.rope_parameters["full_attention"]["rope_theta"], d
    return "", config.rope_parameters["rope_theta"], d


# ----------------------------------------------------------------- formulas on every architecture


@pytest.mark.parametrize("name", ["yarn", "linear", "ntk", "llama3"])
def test_static_patches_match_paper_formulas(arch, name):
    model = tiny_model(arch)
    prefix, theta, d = rope_slot(model)
    surgery.apply(model, name, factor=4)
    expected, scale = FORMULAS[name](theta, d, 4.0, L0)
    rot = rotary(model)
    got = getattr(rot, f"{prefix}inv_freq").double()
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    got_scale = getattr(rot, f"{prefix}attention_scaling")
    assert got_scale == pytest.approx(scale, rel=1e-12)
    assert model.config.max_position_embeddings == 4 * L0


def test_yarn_temperature_applied_once_to_cos_and_sin():
    model = tiny_model("llama")
    surgery.apply(model, "yarn", factor=8)
    inv, mscale = yarn_formula(10000.0, 16, 8.0, L0)
    assert mscale == pytest.approx(1.2079441541679836)
    pos = torch.arange(200)[None]
    cos, sin = rotary(model)(torch.zeros(1, dtype=torch.float32), pos)
    angles = pos[0, :, None].double() * torch.cat([inv, inv])[None]
    torch.testing.assert_close(cos[0].double(), angles.cos() * mscale, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sin[0].double(), angles.sin() * mscale, rtol=1e-4, atol=1e-5)


def test_dynamic_ntk_matches_formula_past_original_length(arch):
    model = tiny_model(arch)
    if arch == "phi3":  # Phi3 configs accept default/longrope only: dynamic cannot persist
        with pytest.raises(UnsupportedModel, match="dynamic-ntk cannot persist"):
            surgery.apply(model, "dynamic-ntk", factor=4)
        return
    prefix, theta, d = rope_slot(model)
    before = getattr(rotary(model), f"{prefix}inv_freq").clone()
    surgery.apply(model, "dynamic-ntk", factor=4)
    assert model.config.max_position_embeddings == L0  # dynamic keeps the original length
    rot = rotary(model)
    torch.testing.assert_close(getattr(rot, f"{prefix}inv_freq"), before)  # below L0: unchanged
    with torch.no_grad():
        model(tokens(150))
    got = getattr(rot, f"{prefix}inv_freq").double()
    torch.testing.assert_close(got, dynamic_formula(theta, d, 4.0, L0, 150), rtol=1e-6, atol=0)


def test_gemma3_rescales_full_attention_layers_only_by_default():
    model = tiny_model("gemma3")
    sliding = rotary(model).sliding_attention_inv_freq.clone()
    surgery.apply(model, "yarn", factor=4)
    assert model.config.rope_parameters["sliding_attention"]["rope_type"] == "default"
    assert model.config.rope_parameters["full_attention"]["rope_type"] == "yarn"
    assert torch.equal(rotary(model).sliding_attention_inv_freq, sliding)

    everything = tiny_model("gemma3")
    surgery.apply(everything, "linear", factor=2, apply_to="all")
    torch.testing.assert_close(
        everything.model.rotary_emb.sliding_attention_inv_freq.double(), base_inv_freq(10000.0, 16) / 2
    )


# ----------------------------------------------------------------- behaviour and persistence


def test_yarn_factor_one_is_identity(arch):
    model = tiny_model(arch)
    ids = tokens(100)
    before = logits(model, ids)
    surgery.apply(model, "yarn", factor=1)
    assert (logits(model, ids) - before).abs().max() < 1e-5


def test_scaling_changes_logits_past_original_length():
    model = tiny_model("llama")
    ids = tokens(100)
    before = logits(model, ids)
    surgery.apply(model, "yarn", factor=4)
    assert (logits(model, ids) - before).abs().max() > 1e-3


@pytest.mark.parametrize("name", ROPE)
def test_rescaling_twice_equals_once_from_the_origin(name):
    twice, once = tiny_model("llama"), tiny_model("llama")
    surgery.apply(twice, name, factor=2)
    surgery.apply(twice, name, factor=2)
    surgery.apply(once, name, factor=4)
    assert twice.config.rope_parameters == once.config.rope_parameters
    assert twice.config.max_position_embeddings == once.config.max_position_embeddings
    ids = tokens(150)
    torch.testing.assert_close(logits(twice, ids), logits(once, ids), rtol=0, atol=0)
    if "original_max_position_embeddings" in once.config.rope_parameters:
        assert twice.config.rope_parameters["original_max_position_embeddings"] == L0


def test_rescaling_across_methods_starts_from_origin_theta():
    model = tiny_model("llama")
    surgery.apply(model, "ntk", factor=2)
    surgery.apply(model, "yarn", factor=2)  # total 4, from the original theta, not the NTK one
    params = model.config.rope_parameters
    assert params["rope_theta"] == 10000.0 and params["factor"] == 4.0
    assert params["original_max_position_embeddings"] == L0
    assert [r["name"] for r in model.config.surgery] == ["ntk", "yarn"]


def test_phi3_stores_static_scaling_as_equivalent_longrope(tmp_path):
    model = tiny_model("phi3")
    surgery.apply(model, "yarn", factor=2)
    surgery.apply(model, "yarn", factor=2)  # re-scaling our own longrope encoding works
    params = model.config.rope_parameters
    assert params["rope_type"] == "longrope" and params["short_factor"] == params["long_factor"]
    expected, mscale = yarn_formula(10000.0, 8, 4.0, L0)
    torch.testing.assert_close(rotary(model).inv_freq.double(), expected, rtol=1e-6, atol=0)
    assert params["attention_factor"] == pytest.approx(mscale)


def test_record_describes_the_change():
    model = tiny_model("llama")
    record = surgery.apply(model, "yarn", factor=4)
    assert record.config_diff["max_position_embeddings"] == {"before": 64, "after": 256}
    assert record.config_diff["rope_parameters"]["after"]["rope_type"] == "yarn"
    assert record.parameters_before == record.parameters_after == sum(p.numel() for p in model.parameters())
    assert record.kv_bytes_per_token_before == 2 * 2 * 2 * 16 * 4  # k,v x layers x kv heads x head_dim x fp32
    assert model.config.surgery[0]["details"]["origin"]["global"] == {
        "rope_theta": 10000.0,
        "max_len": 64,
        "factor": 1.0,
    }


def test_verification_catches_a_rewrite_that_did_nothing(monkeypatch):
    import surgery.patches.rope as rope

    monkeypatch.setattr(rope, "rebuild_rotary", lambda model: None)
    with pytest.raises(PatchDidNotTakeEffect):
        surgery.apply(tiny_model("llama"), "yarn", factor=4)


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("yarn", {"factor": 0.5}, "greater than or equal to 1"),
        ("yarn", {"factor": 2, "beta_fast": 1, "beta_slow": 2}, "beta_fast (1) must be greater than beta_slow (2)"),
        ("yarn", {"factr": 2}, "did you mean 'factor'"),
        ("yarn", {}, "factor: required"),
        ("llama3", {"factor": 8, "low_freq_factor": 4, "high_freq_factor": 1}, "high_freq_factor"),
        ("linear", {"factor": 2, "apply_to": "sliding"}, "apply_to"),
        ("ntk", {"factor": "lots"}, "valid number"),
    ],
)
def test_invalid_parameters_are_refused(name, params, message):
    with pytest.raises(InvalidParams, match=message.replace("(", r"\(").replace(")", r"\)")):
        surgery.make_patch(name, **params)


def test_unknown_patch_suggests_the_closest():
    with pytest.raises(surgery.SurgeryError, match="did you mean 'yarn'"):
        surgery.make_patch("yran", factor=2)


def test_model_without_rotary_is_unsupported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModel, match="supports model types"):
        surgery.apply(model, "yarn", factor=2)


def test_longrope_model_cannot_be_rescaled():
    half = 4  # rotary dim 8 -> 4 frequencies
    model = tiny_model(
        "phi3",
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "short_factor": [1.0] * half,
            "long_factor": [2.0] * half,
            "original_max_position_embeddings": 32,
        },
    )
    with pytest.raises(UnsupportedModel, match="longrope"):
        surgery.apply(model, "yarn", factor=2)
