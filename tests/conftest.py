"""Tiny random models built in-process, one per supported architecture; no network."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

ARCHS = {
    "llama": (tf.LlamaConfig, {}),
    "mistral": (tf.MistralConfig, {"sliding_window": None}),
    "qwen2": (tf.Qwen2Config, {}),  # q/k/v biases, no head_dim
    "qwen3": (tf.Qwen3Config, {"head_dim": 16}),  # per-head q_norm/k_norm
    "gemma3": (
        tf.Gemma3TextConfig,
        {"head_dim": 16, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    "phi3": (tf.Phi3Config, {"partial_rotary_factor": 0.5, "original_max_position_embeddings": 64}),
}


def tiny_config(arch: str, **overrides):
    cls, extra = ARCHS[arch]
    return cls(**{**COMMON, **extra, **overrides})


def tiny_model(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    return model.eval()


def tokens(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, COMMON["vocab_size"], (batch, n), generator=g)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@pytest.fixture(params=sorted(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def saved_tiny(tmp_path: Path):
    """Save a tiny model of the given architecture; returns its directory."""

    def make(arch: str = "llama", **overrides) -> Path:
        out = tmp_path / f"tiny-{arch}"
        tiny_model(arch, **overrides).save_pretrained(out)
        return out

    return make


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def char_tokenizer():
    """A character-level tokenizer whose 99 ids fit the tiny models' 128-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


@pytest.fixture
def lossless_mla(monkeypatch):
    """Lift mla's refusal of a latent as wide as the cache it replaces, for the tests that prove the
    conversion exact at full rank (which keeps everything, so the cache does not shrink)."""
    from surgery.patches.mla import MLA

    monkeypatch.setattr(MLA, "check_compresses", lambda self, config, rot: None)
