"""attention: backends agree, the choice persists in config.json, missing packages are one line."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import surgery
from surgery.cli import main
from surgery.errors import UnsupportedModel
from surgery.patches.attention import availability
from tests.conftest import logits, tiny_model, tokens


def test_backends_give_equal_logits(arch):
    ids = tokens(50, batch=2)
    reference = logits(tiny_model(arch), ids)  # sdpa
    model = tiny_model(arch)
    surgery.apply(model, "attention", impl="eager")
    torch.testing.assert_close(logits(model, ids), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # flex compiles on first use: full and sliding masks
def test_flex_attention_gives_equal_logits(arch):
    ids = tokens(50, batch=2)
    reference = logits(tiny_model(arch), ids)
    model = tiny_model(arch)
    surgery.apply(model, "attention", impl="flex_attention")
    torch.testing.assert_close(logits(model, ids), reference, rtol=1e-4, atol=1e-5)


def test_backend_survives_save_and_stock_reload(tmp_path):
    model = tiny_model("qwen2")
    surgery.apply(model, "attention", impl="eager")
    surgery.save(model, None, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["attn_implementation"] == "eager"
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert stock.config._attn_implementation == "eager"


def test_config_only_cli_writes_the_backend(saved_tiny, tmp_path):
    result = CliRunner().invoke(
        main, ["apply", "attention", "--impl", "flex_attention", str(saved_tiny("llama")), "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    assert "config only" in result.output
    assert json.loads((tmp_path / "o" / "config.json").read_text())["attn_implementation"] == "flex_attention"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o").config._attn_implementation == "flex_attention"


@pytest.mark.skipif(availability("flash_attention_2") is None, reason="flash-attn is installed here")
def test_missing_flash_attention_is_one_clear_line(saved_tiny, tmp_path):
    with pytest.raises(UnsupportedModel, match="needs a CUDA GPU and the package flash-attn"):
        surgery.apply(tiny_model("llama"), "attention", impl="flash_attention_2")
    result = CliRunner().invoke(
        main, ["apply", "attention", "--impl", "flash_attention_2", str(saved_tiny("llama")), "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "pip install flash-attn" in result.stderr
    assert not (tmp_path / "o").exists()
