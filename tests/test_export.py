"""GGUF export of the embedded model: read back by transformers' own GGUF loader with the logits of
the safetensors checkpoint (f32: equal; f16, q8_0: within a stated tolerance), metadata read back
with the `gguf` reader, and the tokenizer metadata compared key by key with the GGUF llama.cpp's
own converter wrote for this model (the file the embedded model ships as)."""

from __future__ import annotations

import gguf
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import surgery
from surgery.cli import main
from surgery.models import local_dir, resolve

pytestmark = pytest.mark.slow

TOKENIZER_KEYS = [
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
]


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents() if key in reader.fields else None


def export(src, out, *flags) -> None:
    result = CliRunner().invoke(main, ["export", "gguf", str(src), "-o", str(out), *flags])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def embedded():
    return local_dir(resolve("smollm2"))


@pytest.fixture(scope="module")
def ids(embedded):
    _, tokenizer = surgery.load_model(str(embedded), dtype="float32")
    return tokenizer("Model surgery rewrites a loaded model in place. " * 6, return_tensors="pt").input_ids


def logits_of(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def stock_gguf(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


def test_the_embedded_model_round_trips_exactly_in_f32(embedded, ids, exact, tmp_path):
    out = tmp_path / "smollm2-f32.gguf"
    export(embedded, out, "--type", "f32")
    assert torch.equal(logits_of(stock_gguf(out), ids), exact)
    ours, shipped = gguf.GGUFReader(out), gguf.GGUFReader(resolve("smollm2").location)
    for key in TOKENIZER_KEYS:  # what llama.cpp's converter wrote for this tokenizer
        assert field(ours, key) == field(shipped, key), key
    for key in ("llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base"):
        assert field(ours, key) == field(shipped, key), key


@pytest.fixture(scope="module")
def exact(embedded, ids):
    return logits_of(surgery.load_model(str(embedded))[0], ids)


# mean KL(exact || exported) per token, nats: f16 rounds each weight to 11 significant bits, q8_0
# to 8 bits per block of 32 weights (measured: f16 ~1e-6, q8_0 ~1e-3)
TOLERANCE = {"f16": 1e-4, "q8_0": 1e-2}


@pytest.mark.heavy  # two more exports and loads of the embedded model; `make test-all` runs it
def test_f16_and_q8_0_stay_within_a_stated_tolerance(embedded, ids, exact, tmp_path):
    for kind, tolerance in TOLERANCE.items():
        out = tmp_path / f"smollm2-{kind}.gguf"
        export(embedded, out, "--type", kind)
        got = logits_of(stock_gguf(out), ids)
        reference = exact.log_softmax(-1)
        kl = (reference.exp() * (reference - got.log_softmax(-1))).sum(-1).mean().item()
        agree = (got.argmax(-1) == exact.argmax(-1)).float().mean().item()
        print(f"{kind}: mean KL {kl:.2e}, top-1 agreement {agree:.3f}")
        assert 0 < kl < tolerance and agree > 0.95, (kind, kl, agree)
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
        assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType[kind.upper()]
        assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_yarn_and_mqa_are_in_the_metadata_and_the_logits(embedded, ids, tmp_path, monkeypatch):
    from surgery.models import gguf_rope_parameters

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))  # the exported GGUF converts here, not in ~
    runner = CliRunner()
    for patch, flags in (("yarn", ["--factor", "2"]), ("mqa", [])):
        patched = tmp_path / patch
        assert runner.invoke(main, ["apply", patch, *flags, str(embedded), "-o", str(patched)]).exit_code == 0
        out = tmp_path / f"{patch}.gguf"
        export(patched, out, "--type", "f32", "--tokenizer-pre", "smollm")
        reader = gguf.GGUFReader(out)
        reference = surgery.load_model(str(patched))[0]
        stock = stock_gguf(out)  # transformers' loader: head counts from the metadata, RoPE base only
        assert stock.config.num_key_value_heads == reference.config.num_key_value_heads
        if patch == "yarn":
            assert field(reader, "llama.rope.scaling.type") == "yarn"
            assert field(reader, "llama.rope.scaling.factor") == 2.0
            assert field(reader, "llama.rope.scaling.original_context_length") == 8192
            assert field(reader, "llama.context_length") == 16384
            # transformers' GGUF loader drops the scaling; surgery's reads it back from the file
            assert not torch.equal(logits_of(stock, ids), logits_of(reference, ids))
            assert gguf_rope_parameters(out) == reference.config.rope_parameters
            loaded = surgery.load_model(str(out))[0]
            assert loaded.config.rope_parameters["rope_type"] == "yarn"
            assert torch.equal(logits_of(loaded, ids), logits_of(reference, ids))
        else:
            assert field(reader, "llama.attention.head_count_kv") == 1
            assert torch.equal(logits_of(stock, ids), logits_of(reference, ids))


def test_what_gguf_cannot_say_is_refused_or_named(embedded, tmp_path):
    patched = tmp_path / "kivi"
    model, tokenizer = surgery.load_model(str(embedded))
    surgery.apply(model, "kv-quant", bits=4)
    surgery.save(model, tokenizer, patched)
    out = tmp_path / "kivi.gguf"
    refused = CliRunner().invoke(main, ["export", "gguf", str(patched), "-o", str(out)])
    assert (
        refused.exit_code == 2 and "GGUF cannot express kv-quant" in refused.stderr and "--allow-loss" in refused.stderr
    )
    assert not out.exists() and not list(tmp_path.glob(".kivi.gguf*"))
    lossy = CliRunner().invoke(main, ["export", "gguf", str(patched), "-o", str(out), "--allow-loss"])
    assert lossy.exit_code == 0 and "warning: the GGUF file leaves out: kv-quant" in lossy.stderr
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"
    # --force replaces a GGUF file, and nothing else
    again = CliRunner().invoke(main, ["export", "gguf", str(patched), "-o", str(out), "--allow-loss"])
    assert again.exit_code == 2 and "already exists" in again.stderr
    notes = tmp_path / "notes.gguf"
    notes.write_text("mine")
    forced = CliRunner().invoke(main, ["export", "gguf", str(embedded), "-o", str(notes), "--force"])
    assert forced.exit_code == 2 and "not a GGUF file" in forced.stderr and notes.read_text() == "mine"
    inside = CliRunner().invoke(main, ["export", "gguf", str(patched), "-o", str(patched / "x.gguf")])
    assert inside.exit_code == 2 and "inside the checkpoint" in inside.stderr
