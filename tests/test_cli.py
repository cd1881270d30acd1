"""The `surgery` command end to end with click's runner on tiny saved models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import surgery
from surgery.cli import main
from tests.conftest import logits, tokens

CONFIGS = Path(__file__).parent / "fixtures" / "configs"


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.output


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_list_shows_patches_parameters_and_architectures():
    result = run("list")
    assert result.exit_code == 0
    for name in ("yarn", "ntk", "dynamic-ntk", "linear", "llama3"):
        assert f"{name}  [config]" in result.output
    assert "--beta-fast float (default 32.0)" in result.output
    assert "architectures: llama, mistral, qwen2, qwen3, gemma3_text, phi3" in result.output
    described = json.loads(run("list", "--json").output)
    yarn = next(d for d in described if d["name"] == "yarn")
    assert yarn["parameters"][0] == {
        "name": "factor",
        "type": "float",
        "required": True,
        "default": None,
        "description": yarn["parameters"][0]["description"],
    }


def test_inspect_json_and_text():
    result = run("inspect", CONFIGS / "llama-3-8b", "--context", "32k,128k", "--kv-dtype", "fp16", "--json")
    assert result.exit_code == 0
    got = json.loads(result.output)
    assert [s["bytes"] for s in got["kv_cache"]] == [4 * 1024**3, 16 * 1024**3]
    text = run("inspect", CONFIGS / "llama-3-8b", "--context", "32k", "--kv-dtype", "fp16").output
    assert "128 KiB per token" in text and "4 GiB" in text and "512 KiB if every query head" in text


@pytest.mark.parametrize("load_weights", [False, True])
def test_apply_writes_a_complete_checkpoint(saved_tiny, tmp_path, load_weights):
    src = saved_tiny("llama")
    out = tmp_path / "yarn4"
    args = ["apply", "yarn", "--factor", "4", src, "-o", out] + (["--load-weights"] if load_weights else [])
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert {"config.json", "generation_config.json", "model.safetensors", "surgery.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    manifest = json.loads((out / "surgery.json").read_text())
    assert manifest["patches"][0]["name"] == "yarn" and manifest["patches"][0]["params"]["factor"] == 4.0
    assert set(manifest["versions"]) == {"surgery", "transformers", "torch"}
    assert "| 1 | `yarn` |" in (out / "README.md").read_text()
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert stock.config.rope_parameters["rope_type"] == "yarn" and stock.config.max_position_embeddings == 256
    assert leftovers(tmp_path) == []


def test_config_only_and_loaded_paths_agree(saved_tiny, tmp_path):
    src = saved_tiny("qwen2")
    assert run("apply", "ntk", "--factor", "2", src, "-o", tmp_path / "a").exit_code == 0
    assert run("apply", "ntk", "--factor", "2", src, "-o", tmp_path / "b", "--load-weights").exit_code == 0
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in "ab")
    assert a == b
    ids = tokens(100)
    la = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "a"), ids)
    lb = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "b"), ids)
    assert torch.equal(la, lb)


def test_default_output_is_named_after_model_and_patch(saved_tiny, tmp_path, monkeypatch):
    src = saved_tiny("mistral")
    monkeypatch.chdir(tmp_path)
    result = run("apply", "linear", "--factor", "2", src)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tiny-mistral-linear-factor2" / "config.json").is_file()


def test_existing_output_is_refused_then_replaced_with_force(saved_tiny, tmp_path):
    src = saved_tiny("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(run("apply", "yarn", "--factor", "2", src, "-o", out), "already exists; pass --force")
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces only what surgery wrote: a directory with someone's file stays
    assert_user_error(run("apply", "yarn", "--factor", "2", src, "-o", out, "--force"), "was not written by surgery")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty directory may be replaced
    assert run("apply", "yarn", "--factor", "2", src, "-o", out, "--force").exit_code == 0
    assert (out / "config.json").is_file() and (out / "surgery.json").is_file()
    assert run("apply", "yarn", "--factor", "4", src, "-o", out, "--force").exit_code == 0  # surgery's own
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 256
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["apply", "yran", "--factor", "2", "MODEL"], "unknown patch 'yran'; did you mean 'yarn'?"),
        (["apply", "yarn", "--factor", "0.5", "MODEL"], "--factor: Input should be greater than or equal to 1"),
        (["apply", "yarn", "--factor", "abc", "MODEL"], "'abc' is not a valid float"),
        (["apply", "yarn", "MODEL"], "--factor: required"),
        (["apply", "yarn", "--factr", "2", "MODEL"], "No such option '--factr'. Did you mean '--factor'?"),
        (
            ["apply", "yarn", "--factor", "2", "--beta-fast", "1", "--beta-slow", "2", "MODEL"],
            "beta_fast (1) must be greater",
        ),
        (["apply", "yarn", "--factor", "2", "does/not/exist"], "no such file or directory: does/not/exist"),
        (["apply", "yarn", "--factor", "2", "./missing-model"], "no such file or directory"),
        (["apply", "yarn", "--factor", "2", "MODEL", "--dtype", "float12"], "unknown dtype 'float12'"),
        (["inspect", "MODEL", "--context", "lots"], "bad context length 'lots'"),
        (["inspect", "MODEL", "--kv-dtype", "int3"], "unknown KV dtype 'int3'"),
        (["frobnicate"], "No such command 'frobnicate'"),
    ],
)
def test_user_errors_are_one_line_exit_2_and_write_nothing(saved_tiny, tmp_path, monkeypatch, args, message):
    src = saved_tiny("llama")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_user_error(run(*[str(src) if a == "MODEL" else a for a in args]), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_unsupported_model_is_a_user_error(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    for extra in ([], ["--load-weights"]):
        result = run("apply", "yarn", "--factor", "2", tmp_path / "gpt2", "-o", tmp_path / "out", *extra)
        assert_user_error(result, "yarn supports model types llama")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_failure_while_writing_leaves_no_output(saved_tiny, tmp_path, monkeypatch):
    import surgery.hub

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(surgery.hub, "write_metadata", broken)
    assert_user_error(run("apply", "yarn", "--factor", "2", saved_tiny("llama"), "-o", tmp_path / "out"), "disk full")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_version():
    assert surgery.__version__ in run("--version").output


def test_apply_sliding_window_with_a_layer_list(saved_tiny, tmp_path):
    src = saved_tiny("qwen2")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["apply", "sliding-window", "--window", "8", "--layers", "0", str(src), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "full_attention"] and config["sliding_window"] == 8
    bad = CliRunner().invoke(main, ["apply", "sliding-window", "--window", "8", "--layers", "0,x", str(src)])
    assert bad.exit_code == 2 and "comma-separated integers" in bad.output


def test_apply_kv_quant_bits_choice(saved_tiny, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "apply",
            "kv-quant",
            "--bits",
            "4",
            "--group-size",
            "8",
            "--residual",
            "16",
            str(saved_tiny()),
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "config.json").read_text())["surgery"][-1]
    assert record["params"]["bits"] == 4 and record["persist"] == "runtime"
    bad = CliRunner().invoke(main, ["apply", "kv-quant", "--bits", "3", str(saved_tiny())])
    assert bad.exit_code == 2 and "'3' is not one of '8', '4', '2'" in bad.output
