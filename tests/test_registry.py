"""Invariants every registered patch must satisfy. Registering a patch with `examples` enrols it:
each example is applied to each tiny architecture, and the result must persist as promised."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import surgery
from surgery.errors import UnsupportedModel
from surgery.patch import PATCHES
from tests.conftest import ARCHS, char_tokenizer, logits, tiny_model, tokens

# (patch, arch) pairs that must be refused, with the reason the refusal must give
REFUSED = {("dynamic-ntk", "phi3"): "cannot persist"}

CASES = [
    (name, i, arch) for name in sorted(PATCHES) for i in range(len(PATCHES[name].examples)) for arch in sorted(ARCHS)
]


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_patch_declares_itself(name):
    cls = PATCHES[name]
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name)
    assert cls.persist in ("config", "runtime") and cls.examples and cls.architectures
    assert (cls.__doc__ or "").strip(), "the docstring is the patch's description in `surgery list`"
    for field, info in cls.model_fields.items():
        assert info.description, f"{name}.{field} needs a description (CLI help and docs reuse it)"
    for example in cls.examples:
        patch = cls(**example)
        assert patch.slug().startswith(name)
        assert cls(**patch.model_dump()) == patch  # parameters round-trip


@pytest.mark.parametrize("name, example, arch", CASES)
def test_example_applies_and_persists(name, example, arch, tmp_path):
    cls = PATCHES[name]
    params = cls.examples[example]
    model = tiny_model(arch)
    if (name, arch) in REFUSED or model.config.model_type not in cls.architectures:
        with pytest.raises(UnsupportedModel, match=REFUSED.get((name, arch), "supports model types")):
            surgery.apply(model, name, tokenizer=char_tokenizer(), **params)
        return
    ids = tokens(100)  # past the tiny models' 64 positions, where RoPE scaling matters
    record = surgery.apply(model, name, tokenizer=char_tokenizer(), **params)
    assert model.config.surgery[-1] == record.model_dump(mode="json")
    patched = logits(model, ids)
    surgery.save(model, None, tmp_path / "out")
    if record.persist == "config":
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    else:
        reloaded, _ = surgery.load_model(str(tmp_path / "out"))
    assert torch.equal(logits(reloaded, ids), patched)
    prompt = ids[:, :8]
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 14)
    assert torch.equal(generated, reloaded.generate(prompt, max_new_tokens=6, do_sample=False))
