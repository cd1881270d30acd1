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
from tests.conftest import ARCHS, char_tokenizer, logits, tiny_config, tiny_model, tokens

# (patch, arch) pairs that must be refused, with the reason the refusal must give
REFUSED = {
    ("dynamic-ntk", "phi3"): "cannot persist",
    ("mla", "qwen2"): "q/k/v projections have biases",
    ("mla", "qwen3"): "q_norm/k_norm",
}

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


def on_disk(cls, example: dict) -> bool:
    """Config-only patches, and streamable ones whose parameters need no forward (dry_run is itself)."""
    return cls.config_only or (cls.streamable and cls(**example).dry_run() == cls(**example))


DISK_CASES = [
    (name, i, arch)
    for name in sorted(PATCHES)
    for i, example in enumerate(PATCHES[name].examples)
    if on_disk(PATCHES[name], example)
    for arch in sorted(ARCHS)
    if tiny_config(arch).model_type in PATCHES[name].architectures and (name, arch) not in REFUSED
]


@pytest.mark.parametrize("name, example, arch", DISK_CASES)
def test_checkpoint_routes_equal_the_in_memory_patch(name, example, arch, tmp_path):
    """A config-only patch applied to a checkpoint on disk (no weights read), and a streamable one
    converted tensor by tensor, give what the in-memory patch gives: same config, same tensors."""
    from safetensors.torch import load_file

    from surgery.hub import apply_config_only
    from surgery.streaming import apply_streaming

    cls = PATCHES[name]
    patch = cls(**cls.examples[example])
    src = tmp_path / "src"
    tiny_model(arch).save_pretrained(src)
    loaded, _ = surgery.load_model(str(src))
    surgery.apply(loaded, patch, tokenizer=char_tokenizer())
    surgery.save(loaded, None, tmp_path / "memory")
    route = apply_config_only if cls.config_only else apply_streaming
    route(patch, src, tmp_path / "disk")

    def config(directory):
        saved = AutoModelForCausalLM.from_pretrained(directory).config.to_dict()
        return {k: v for k, v in saved.items() if k not in ("surgery", "_name_or_path", "transformers_version")}

    assert config(tmp_path / "disk") == config(tmp_path / "memory")
    disk, memory = (
        load_file(tmp_path / "disk" / "model.safetensors"),
        load_file(tmp_path / "memory" / "model.safetensors"),
    )
    assert disk.keys() == memory.keys() and all(torch.equal(disk[k], memory[k]) for k in disk)
    records = [r["params"] for r in AutoModelForCausalLM.from_pretrained(tmp_path / "disk").config.surgery]
    assert records == [patch.model_dump(mode="json")]


def test_a_patch_that_cannot_prove_its_effect_does_not_register():
    from surgery.patch import Patch, register

    class Unverified(Patch):
        """Changes something and proves nothing."""

        name = "unverified"
        architectures = ("llama",)
        examples = [{}]

        def rewrite(self, model, ctx):
            return []

    with pytest.raises(TypeError, match="must implement rewrite and verify"):
        register(Unverified)
    assert "unverified" not in PATCHES


def _bounds(field) -> tuple[bool, bool]:
    """(has a lower bound, has an upper bound) among a pydantic field's constraints."""
    import annotated_types as at

    lower = any(isinstance(m, (at.Ge, at.Gt)) for m in field.metadata)
    upper = any(isinstance(m, (at.Le, at.Lt)) for m in field.metadata)
    return lower, upper


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_every_number_a_patch_takes_is_bounded_on_both_sides(name):
    """A size parameter without a checked bound is a way to spend minutes, or fill a disk, before a
    refusal (an MLA rank of 100000 once wrote 17 GB): every int and float parameter has both."""
    import typing

    unbounded = []
    for field_name, field in PATCHES[name].model_fields.items():
        kinds = set(typing.get_args(field.annotation)) or {field.annotation}
        if kinds & {int, float} and _bounds(field) != (True, True):
            unbounded.append(field_name)
    assert unbounded == [], f"{name}: {unbounded}"
