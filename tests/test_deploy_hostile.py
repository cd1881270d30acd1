"""Hostile inputs against export, push, calibrated fp8 scales and the torch-free config route, on
tiny models in-process: one line and exit 2, nothing half-written, `--force` only onto what it
may replace, and the config route agreeing with the loaded route or deferring to it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import surgery
from surgery.cli import main
from tests.conftest import char_tokenizer, tiny_model


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, text: str) -> None:
    """Exit 2 and one `error:` line (after any library progress bar, which a terminal-less CLI
    process turns off before importing the library; this process imported it already)."""
    assert result.exit_code == 2, result.output
    lines = [line.split("\r")[-1] for line in result.stderr.strip().splitlines()]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [lines[-1]] and text in errors[0], result.stderr
    assert "Traceback" not in result.output


def byte_bpe(vocab: int = 100):
    """A byte-level BPE tokenizer (the kind GGUF's gpt2 model holds) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(["model surgery rewrites a loaded model in place"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_gguf_src(tmp_path) -> Path:
    out = tmp_path / "src"
    surgery.save(tiny_model("llama"), byte_bpe(), out)
    return out


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_export_writes_with_the_umask_and_removes_a_killed_writers_debris(tiny_gguf_src, tmp_path):
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    debris = out.parent / f".{out.name}.tmp-file"
    debris.write_bytes(b"half a file")
    result = run("export", "gguf", tiny_gguf_src, "-o", out, "--type", "q8_0")
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()
    assert leftovers(out.parent) == []


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_export_refuses_bad_outputs_in_one_line(tiny_gguf_src, tmp_path):
    (tmp_path / "afile").write_text("x")
    one_line_error(run("export", "gguf", tiny_gguf_src, "-o", tmp_path / "afile" / "m.gguf"), "cannot write in")
    assert not (tmp_path / "afile" / "m.gguf").exists()
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    one_line_error(run("export", "gguf", tiny_gguf_src, "-o", fifo, "--force"), "not a GGUF file")  # and no hang
    first = tmp_path / "first.gguf"
    assert run("export", "gguf", tiny_gguf_src, "-o", first).exit_code == 0
    one_line_error(run("export", "gguf", first, "-o", first, "--force"), "is the source")
    deep = tmp_path / "new" / "a" / "m.gguf"
    one_line_error(run("export", "gguf", tmp_path / "missing", "-o", deep), "no such file")
    assert not (tmp_path / "new").exists()


def test_export_refuses_a_tokenizer_bigger_than_the_embedding(tmp_path):
    src = tmp_path / "src"
    surgery.save(tiny_model("llama", vocab_size=32), byte_bpe(vocab=100), src)  # 32 embedding rows
    result = run("export", "gguf", src, "-o", tmp_path / "m.gguf")
    one_line_error(result, "the tokenizer has")
    assert "warning" not in result.stderr and not (tmp_path / "m.gguf").exists()


def test_push_refuses_links_and_names_a_missing_gguf(tmp_path):
    folder = tmp_path / "saved"
    surgery.save(tiny_model("llama"), char_tokenizer(), folder)
    one_line_error(run("push", folder, "me/tiny", "--gguf", tmp_path / "nope.gguf"), "no such file")
    one_line_error(run("push", folder, "us er/na me"), "is not valid")
    (tmp_path / "secret.txt").write_text("secret")
    (folder / "notes.txt").symlink_to(tmp_path / "secret.txt")
    one_line_error(run("push", folder, "me/tiny"), "is a symbolic link")


def saved_fp8(tmp_path: Path) -> Path:
    model, tok = tiny_model("llama"), char_tokenizer()
    surgery.apply(model, "kv-quant", method="fp8", scales="head", calibration_tokens=128, tokenizer=tok)
    surgery.save(model, tok, tmp_path / "fp8")
    return tmp_path / "fp8"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t: t.fill_(float("nan")), "is not a positive number"),
        (lambda t: t.mul_(-1), "is not a positive number"),
        (lambda t: t.reshape(-1)[:1].clone(), "is shaped [1]"),
    ],
)
def test_damaged_fp8_scales_are_refused_at_load(tmp_path, damage, message):
    path = saved_fp8(tmp_path)
    weights = load_file(path / "model.safetensors")
    name = "model.layers.1.self_attn.k_scale"
    weights[name] = damage(weights[name]) if damage(weights[name].clone()) is not None else weights[name]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    result = run("eval", path, "--eval", "perplexity lengths=16 samples=1", "-o", tmp_path / "r.json")
    one_line_error(result, message)


def test_a_calibrated_checkpoint_is_not_requantized_on_top(tmp_path):
    path = saved_fp8(tmp_path)
    result = run("apply", "kv-quant", "--method", "fp8", path, "-o", tmp_path / "again")
    one_line_error(result, "already carries calibrated fp8 KV scales")
    assert not (tmp_path / "again").exists()


def edited(src: Path, tmp_path: Path, name: str, **changes) -> Path:
    out = tmp_path / name
    out.mkdir()
    for f in src.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    "changes",
    [
        {"rope_theta": 5000.0, "rope_scaling": {"rope_type": "linear", "factor": 3.0}},  # beside rope_parameters
        {"rope_parameters": {}},
        {"rope_parameters": None},
    ],
    ids=["legacy beside new", "empty rope", "null rope"],
)
def test_the_config_route_agrees_with_loading_the_weights(changes, tmp_path):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    bad = edited(src, tmp_path, "bad", **changes)
    a = run("apply", "yarn", "--factor", "2", bad, "-o", tmp_path / "a")
    b = run("apply", "yarn", "--factor", "2", bad, "-o", tmp_path / "b", "--load-weights")
    assert a.exit_code == b.exit_code == 0, (a.output, b.output)
    rope = [json.loads((tmp_path / d / "config.json").read_text())["rope_parameters"] for d in "ab"]
    assert rope[0] == rope[1]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_attention_heads": "4"}, "config"),
        ({"num_key_value_heads": 0}, "config"),
        ({"max_position_embeddings": None}, "config"),
        ({"dtype": "banana"}, "config"),
    ],
    ids=["string heads", "zero kv heads", "null length", "unknown dtype"],
)
def test_a_config_transformers_rejects_is_one_line_on_both_routes(changes, message, tmp_path):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    bad = edited(src, tmp_path, "bad", **changes)
    for flags in ([], ["--load-weights"]):
        one_line_error(run("apply", "yarn", "--factor", "2", bad, "-o", tmp_path / "o", *flags), message)
        assert not (tmp_path / "o").exists()
    assert torch.is_tensor(load_file(bad / "model.safetensors")["lm_head.weight"])  # the source untouched


def foreign_gguf(path: Path) -> Path:
    """A valid GGUF file that surgery did not write (no `surgery.patches` key)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("someone else's model")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_force_replaces_only_a_gguf_surgery_wrote(tiny_gguf_src, tmp_path):
    theirs = foreign_gguf(tmp_path / "theirs.gguf")
    before = theirs.read_bytes()
    one_line_error(run("export", "gguf", tiny_gguf_src, "-o", theirs, "--force"), "surgery did not write")
    assert theirs.read_bytes() == before and leftovers(tmp_path) == []
    ours = tmp_path / "ours.gguf"
    assert run("export", "gguf", tiny_gguf_src, "-o", ours, "--type", "f32").exit_code == 0
    replaced = run("export", "gguf", tiny_gguf_src, "-o", ours, "--type", "q8_0", "--force")
    assert replaced.exit_code == 0, replaced.output
    import gguf

    assert gguf.GGUFReader(ours).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0


def test_the_embedded_models_file_and_the_cache_are_never_an_output(tiny_gguf_src, tmp_path, monkeypatch):
    from surgery.models import resolve

    embedded = Path(resolve("smollm2").location)  # resolving reads nothing but the package's location
    size, mtime = embedded.stat().st_size, embedded.stat().st_mtime_ns
    one_line_error(run("export", "gguf", tiny_gguf_src, "-o", embedded, "--force"), "holds an embedded model")
    one_line_error(
        run("export", "gguf", tiny_gguf_src, "-o", embedded.with_name("new.gguf")), "holds an embedded model"
    )
    assert (embedded.stat().st_size, embedded.stat().st_mtime_ns) == (size, mtime)
    assert not embedded.with_name("new.gguf").exists()
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    inside = tmp_path / "cache" / "models" / "x.gguf"
    one_line_error(run("export", "gguf", tiny_gguf_src, "-o", inside), "converted cache")
    assert not inside.exists()


def test_push_refuses_a_gguf_that_is_not_this_checkpoints_export(tiny_gguf_src, tmp_path, monkeypatch):
    """Only offline mode stopped these uploads before: a file with nothing but the magic, a GGUF
    someone else wrote, and an export of another model (other kv heads, other patches)."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    magic = tmp_path / "magic.gguf"
    magic.write_bytes(b"GGUF" + bytes(11))  # 15 bytes
    one_line_error(run("push", tiny_gguf_src, "me/tiny", "--gguf", magic), "not a complete GGUF file")
    theirs = foreign_gguf(tmp_path / "theirs.gguf")
    one_line_error(run("push", tiny_gguf_src, "me/tiny", "--gguf", theirs), "not written by surgery")
    other = tmp_path / "other"
    surgery.save(tiny_model("llama", num_key_value_heads=1), byte_bpe(), other)
    assert run("export", "gguf", other, "-o", tmp_path / "other.gguf").exit_code == 0
    one_line_error(
        run("push", tiny_gguf_src, "me/tiny", "--gguf", tmp_path / "other.gguf"),
        "head_count_kv is 1, the checkpoint's 2",
    )
    yarn = tmp_path / "yarn"
    assert run("apply", "yarn", "--factor", "2", tiny_gguf_src, "-o", yarn).exit_code == 0
    assert run("export", "gguf", yarn, "-o", tmp_path / "yarn.gguf").exit_code == 0
    one_line_error(
        run("push", tiny_gguf_src, "me/tiny", "--gguf", tmp_path / "yarn.gguf"), 'records the patches ["yarn"]'
    )
