"""`inspect` from config alone: shapes, parameter counts and KV-cache sizes of public configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import surgery
from surgery.arch import kv_cache_bytes
from surgery.cli import main
from surgery.errors import SurgeryError
from surgery.info import count_parameters, inspect, local_description, parse_length
from tests.conftest import tiny_config, tiny_model

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
KiB, MiB, GiB = 1024, 1024**2, 1024**3


def info(name: str, **kwargs):
    return inspect(surgery.load_config(str(CONFIGS / name)), **kwargs)


def test_llama3_8b_kv_cache_matches_published_arithmetic():
    got = info("llama-3-8b", contexts=(32768, 131072), kv_dtype="fp16")
    assert (got.layers, got.query_heads, got.kv_heads, got.head_dim) == (32, 32, 8, 128)
    assert got.attention == "GQA-4"
    assert got.kv_bytes_per_token == 128 * KiB
    assert [s.bytes for s in got.kv_cache] == [4 * GiB, 16 * GiB]
    # the common mistake: counting every query head as a kv head
    assert got.kv_bytes_per_token_if_mha == 4 * got.kv_bytes_per_token
    assert [s.bytes_if_mha for s in got.kv_cache] == [16 * GiB, 64 * GiB]


def test_counting_32_kv_heads_gives_four_times_the_cache(tmp_path):
    config = json.loads((CONFIGS / "llama-3-8b" / "config.json").read_text())
    config["num_key_value_heads"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    got = inspect(surgery.load_config(str(tmp_path)), contexts=(32768,), kv_dtype="fp16")
    assert got.attention == "MHA"
    assert got.kv_bytes_per_token == 512 * KiB and got.kv_cache[0].bytes == 16 * GiB


@pytest.mark.parametrize(
    "name, parameters, attention, per_token",
    [
        ("llama-3-8b", 8_030_261_248, "GQA-4", 128 * KiB),
        ("llama-2-7b", 6_738_415_616, "MHA", 512 * KiB),
        ("mistral-7b", 7_241_732_096, "GQA-4", 128 * KiB),
        ("qwen2.5-7b", 7_615_616_512, "GQA-7", 56 * KiB),
        ("smollm2-135m", 134_515_008, "GQA-3", 22.5 * KiB),
    ],
)
def test_public_configs(name, parameters, attention, per_token):
    got = info(name, kv_dtype="bf16")
    assert got.parameters == parameters  # built on the meta device, tied weights once
    assert got.attention == attention
    assert got.kv_bytes_per_token == per_token


def test_sliding_layers_are_capped_at_their_window():
    mistral = info("mistral-7b", contexts=(2048, 4096, 32768), kv_dtype="bf16")
    assert mistral.sliding_window == 4096 and mistral.sliding_layers == 32
    assert [s.bytes for s in mistral.kv_cache] == [256 * MiB, 512 * MiB, 512 * MiB]
    qwen = info("qwen2.5-7b", contexts=(131072,), kv_dtype="bf16")  # use_sliding_window: false
    assert qwen.sliding_layers == 0 and qwen.kv_cache[0].bytes == 7 * GiB


def test_hybrid_sliding_pattern_counts_each_layer():
    config = tiny_config("gemma3")  # layer 0 slides over 16 tokens, layer 1 is global
    per_layer_token = 2 * 2 * 16 * 2  # k,v x kv heads x head_dim x bf16
    assert kv_cache_bytes(config, 100, 2) == per_layer_token * (16 + 100)
    assert kv_cache_bytes(config, 100, 2, batch=3) == 3 * per_layer_token * (16 + 100)


def test_batch_and_dtype_scale_linearly():
    one = info("llama-3-8b", contexts=(4096,), kv_dtype="bf16")
    eight = info("llama-3-8b", contexts=(4096,), kv_dtype="int4", batch=8)
    assert eight.kv_cache[0].bytes == one.kv_cache[0].bytes * 8 // 4


def test_directory_with_only_config_reads_no_weights(tmp_path, no_network):
    (tmp_path / "config.json").write_text((CONFIGS / "smollm2-135m" / "config.json").read_text())
    assert info(str(tmp_path)).parameters == 134_515_008


@pytest.mark.parametrize("text, value", [("4k", 4096), ("128K", 131072), ("1m", 1048576), ("2048", 2048)])
def test_parse_length(text, value):
    assert parse_length(text) == value


@pytest.mark.parametrize("bad", ["four", "4q", ""])
def test_parse_length_rejects(bad):
    with pytest.raises(SurgeryError, match="bad context length"):
        parse_length(bad)


def test_unknown_kv_dtype_is_refused():
    with pytest.raises(SurgeryError, match="unknown KV dtype 'int3'"):
        info("llama-3-8b", kv_dtype="int3")


def described_both_ways(directory: Path, parameters: int | None = None):
    """inspect of a local checkpoint read as data (no torch) and through transformers' config."""
    config, counted = local_description(directory)
    parameters = counted if parameters is None else parameters
    assert config is not None
    return inspect(config, parameters=parameters), inspect(surgery.load_config(str(directory)), parameters=parameters)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_reading_config_json_as_data_agrees_with_transformers(arch, tied, tmp_path):
    model = tiny_model(arch, tie_word_embeddings=tied)
    model.config.dtype = "bfloat16"  # what the KV size defaults to
    model.save_pretrained(tmp_path)
    fast, slow = described_both_ways(tmp_path)
    assert fast == slow
    # the safetensors headers hold each parameter once: the count transformers builds on meta
    assert fast.parameters == count_parameters(model.config) == sum(p.numel() for p in model.parameters())


# Llama-2's config has no rope_theta (the class's default applies); Mistral's slides on layers the
# class decides (no layer_types)
CLASS_ONLY = {"llama-2-7b": {"rope_theta": 10000.0, "rope_type": "default"}, "mistral-7b": None}


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.iterdir() if p.name not in CLASS_ONLY))
def test_public_config_files_read_as_data_agree_with_transformers(name, tmp_path):
    # legacy rope_theta/rope_scaling keys, torch_dtype, a disabled sliding window (qwen2.5)
    shutil.copy(CONFIGS / name / "config.json", tmp_path / "config.json")
    save_file({"x": torch.zeros(3, 7)}, tmp_path / "model.safetensors")
    fast, slow = described_both_ways(tmp_path)
    assert fast.parameters == 21
    assert fast == slow


@pytest.mark.parametrize("name", sorted(CLASS_ONLY))
def test_a_config_only_its_class_can_read_goes_through_transformers(name, tmp_path):
    shutil.copy(CONFIGS / name / "config.json", tmp_path / "config.json")
    save_file({"x": torch.zeros(3, 7)}, tmp_path / "model.safetensors")
    assert local_description(tmp_path) == (None, 21)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert got == inspect(surgery.load_config(str(tmp_path)), parameters=21).model_dump()
    if CLASS_ONLY[name]:
        assert got["rope"] == CLASS_ONLY[name]


@pytest.mark.parametrize(
    "change",
    [
        {"sliding_window": 8, "use_sliding_window": True},  # which layers slide is the class's rule
        {"head_dim": None},  # Qwen3's class default is 128, not hidden / heads
        {"num_key_value_heads": None},
    ],
    ids=["window-without-layer-types", "no-head-dim", "no-kv-heads"],
)
def test_a_field_the_class_would_fill_sends_inspect_to_transformers(change, tmp_path):
    config = json.loads(tiny_config("qwen3").to_json_string())
    config.pop("layer_types", None)
    for key, value in change.items():
        config.pop(key) if value is None else config.update({key: value})
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert local_description(tmp_path)[0] is None


def test_the_count_reads_only_the_shards_transformers_loads(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    expected = local_description(tmp_path)[1]
    save_file({"x": torch.zeros(1000)}, tmp_path / "consolidated.safetensors")  # mistral-format copy beside
    assert local_description(tmp_path)[1] == expected
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"")  # pickle only: counted by transformers, never read
    (tmp_path / "consolidated.safetensors").unlink()
    assert local_description(tmp_path)[1] is None
    result = CliRunner().invoke(main, ["inspect", str(tmp_path), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["parameters"] == expected, result.output


def test_a_sliding_window_pattern_without_layer_types_reads_as_transformers_does(tmp_path):
    config = tiny_config("gemma3").to_dict()
    del config["layer_types"]
    config.update(num_hidden_layers=7, sliding_window_pattern=3)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    fast, slow = described_both_ways(tmp_path)
    assert fast == slow and fast.sliding_layers == 5  # layers 3 and 6 attend in full


def test_a_multimodal_config_is_described_by_its_text_part(tmp_path):
    import transformers as tf

    text = tiny_config("gemma3").to_dict()
    config = tf.Gemma3Config(text_config=text, vision_config={"hidden_size": 32, "num_hidden_layers": 1})
    config.save_pretrained(tmp_path)
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    fast, slow = described_both_ways(tmp_path)
    assert fast == slow and fast.layers == 2 and fast.kv_heads == 2
