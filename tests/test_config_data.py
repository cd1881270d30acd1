"""The config route as data (no torch, no model code) against the skeleton route it replaces: the
same parameter list as a meta-device skeleton, the same config as transformers loads it, the same
records; and the skeleton route wherever the data route does not know the class."""

from __future__ import annotations

import json

import pytest
import transformers as tf
from transformers import AutoConfig, AutoModelForCausalLM

import surgery
from surgery.config_data import CAUSAL_LM, CLASS_DEFAULTS, apply_config_data, data_config, expected_shapes
from surgery.hub import apply_config_only
from surgery.models import expected_shapes as skeleton_shapes
from surgery.models import skeleton
from surgery.patch import PATCHES
from tests.conftest import logits, tiny_model, tokens

DATA_ARCHS = sorted(CAUSAL_LM)
ROPE_CASES = [
    (name, example) for name in sorted(PATCHES) if PATCHES[name].config_data for example in PATCHES[name].examples
]


def read(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


def loaded(directory) -> dict:
    """The config as transformers reads it back, less what says who wrote it."""
    config = AutoConfig.from_pretrained(directory).to_dict()
    return {k: v for k, v in config.items() if k not in ("transformers_version", "_name_or_path")}


def test_the_class_facts_match_transformers():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for model_type, name in CAUSAL_LM.items():
        assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type] == name
        defaults = tf.AutoConfig.for_model(model_type)
        for key, value in CLASS_DEFAULTS.items():
            assert getattr(defaults, key, False) == value, (model_type, key)


@pytest.mark.parametrize("arch", DATA_ARCHS)
@pytest.mark.parametrize("tied", [False, True])
def test_the_parameter_list_equals_a_skeletons(arch, tied, tmp_path):
    tiny_model(arch, tie_word_embeddings=tied).save_pretrained(tmp_path)
    config = data_config(read(tmp_path))
    assert config is not None
    assert expected_shapes(config) == skeleton_shapes(skeleton(AutoConfig.from_pretrained(tmp_path)))


@pytest.mark.parametrize("arch", DATA_ARCHS)
@pytest.mark.parametrize("name, example", ROPE_CASES)
def test_the_data_route_writes_what_the_skeleton_route_writes(arch, name, example, tmp_path):
    src = tmp_path / "src"
    tiny_model(arch).save_pretrained(src)
    patch = PATCHES[name](**example)
    records = apply_config_data([patch], src, tmp_path / "data")
    assert records is not None
    _, record = apply_config_only(patch, src, tmp_path / "skeleton")
    assert records == [record]
    assert loaded(tmp_path / "data") == loaded(tmp_path / "skeleton")
    assert (tmp_path / "data" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    ids = tokens(40)
    built = [AutoModelForCausalLM.from_pretrained(tmp_path / d).eval() for d in ("data", "skeleton")]
    assert (logits(built[0], ids) == logits(built[1], ids)).all()


def test_legacy_rope_keys_and_an_earlier_patch_are_carried_as_the_skeleton_route_carries_them(tmp_path):
    """A config.json in the transformers 4 layout (rope_theta, rope_scaling llama3 x8, torch_dtype),
    patched twice: data route and skeleton route agree at each step."""
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    raw = read(src)
    params = raw.pop("rope_parameters")
    raw |= {"rope_theta": params["rope_theta"], "torch_dtype": raw.pop("dtype", "float32")}
    raw["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    (src / "config.json").write_text(json.dumps(raw))
    first, second = PATCHES["yarn"](factor=2), PATCHES["linear"](factor=2)
    assert apply_config_data([first], src, tmp_path / "d1") is not None
    apply_config_only(first, src, tmp_path / "s1")
    assert loaded(tmp_path / "d1") == loaded(tmp_path / "s1")
    assert not {"rope_scaling", "rope_theta"} & read(tmp_path / "d1").keys()
    assert apply_config_data([second], tmp_path / "s1", tmp_path / "d2") is not None
    apply_config_only(second, tmp_path / "s1", tmp_path / "s2")
    assert loaded(tmp_path / "d2") == loaded(tmp_path / "s2")
    rope = loaded(tmp_path / "d2")["rope_parameters"]
    assert rope["rope_type"] == "linear" and rope["factor"] == 32  # llama3 x8, then x2, then x2


def test_a_chain_of_config_patches_equals_the_in_memory_chain(tmp_path):
    src = tmp_path / "src"
    tiny_model("qwen3").save_pretrained(src)
    chain = [PATCHES["yarn"](factor=2), PATCHES["llama3"](factor=4)]
    done = surgery.apply_to_checkpoint(src, chain, tmp_path / "disk")
    assert [s.route for s in done.plan.steps] == ["config", "config"]
    model, _ = surgery.load_model(str(src))
    for patch in chain:
        surgery.apply(model, patch)
    surgery.save(model, None, tmp_path / "memory")
    assert loaded(tmp_path / "disk") == loaded(tmp_path / "memory")


@pytest.mark.parametrize(
    "arch, overrides",
    [("gemma3", {}), ("phi3", {}), ("llama", {"attention_bias": True}), ("llama", {"mlp_bias": True})],
)
def test_classes_it_does_not_know_take_the_skeleton_route(arch, overrides, tmp_path):
    src = tmp_path / "src"
    tiny_model(arch, **overrides).save_pretrained(src)
    assert apply_config_data([PATCHES["yarn"](factor=2)], src, tmp_path / "data") is None
    assert not (tmp_path / "data").exists()
    done = surgery.apply_to_checkpoint(src, [PATCHES["yarn"](factor=2)], tmp_path / "out")
    assert done.plan.steps[0].route == "config" and (tmp_path / "out" / "config.json").is_file()


def test_a_missing_field_the_class_would_fill_takes_the_skeleton_route(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    raw = read(src)
    del raw["intermediate_size"]  # LlamaConfig would fill in 11008
    (src / "config.json").write_text(json.dumps(raw))
    assert data_config(raw) is None
