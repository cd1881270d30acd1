"""Every cache entry carries its full key and is refused when the key is not the one asked for:
reference statistics copied from another model or text domain, a check result copied from another
eval, a converted GGUF copied from another file, and anything written by another version of
surgery, transformers or torch. Each poisoning case is one that decided a verdict before."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

import surgery
import surgery.keys
from surgery.check import cached_result, original_cache, original_key, store
from surgery.evaluate import make_eval
from surgery.keys import mismatch
from tests.conftest import char_tokenizer, tiny_model

LENGTH = 200


@pytest.fixture
def models(tmp_path, monkeypatch):
    """An original and a different model (another seed), both saved with the same tokenizer."""
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    paths = []
    for name, seed in (("original", 0), ("other", 7)):
        surgery.save(tiny_model("llama", seed=seed, max_position_embeddings=512), char_tokenizer(), tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def divergence(model, reference: Path, text: str = "pydoc"):
    e = make_eval("divergence", reference=str(reference), length=LENGTH, samples=2, top_k=16, text=text)
    return e.run(model, char_tokenizer()).metrics


def entries(tmp_path: Path) -> set[Path]:
    return set((tmp_path / "cache" / "reference").glob("*.safetensors"))


def test_statistics_of_another_model_copied_over_the_originals_are_refused(models, tmp_path, caplog):
    original, other = models
    model, _ = surgery.load_model(str(other), dtype="float32")
    honest = divergence(model, original)
    assert honest[f"divergence.pydoc.kl@{LENGTH}"] > 1e-3  # two different random models
    (mine,) = entries(tmp_path)
    assert divergence(model, other)[f"divergence.pydoc.kl@{LENGTH}"] < 1e-9  # the other model against itself
    (theirs,) = entries(tmp_path) - {mine}
    shutil.copy(theirs, mine)  # the poisoning: the original's entry now holds the other model's statistics
    with caplog.at_level(logging.WARNING, logger="surgery"):
        again = divergence(model, original)
    assert again == honest  # without the key check this read KL 0: a pass for any model
    assert "refusing the cached reference statistics" in caplog.text and "its reference differs" in caplog.text


def test_statistics_of_another_domain_are_refused(models, tmp_path, caplog):
    original, _ = models
    model, _ = surgery.load_model(str(original), dtype="float32")
    assert divergence(model, original, "pydoc")[f"divergence.pydoc.kl@{LENGTH}"] < 1e-9
    (pydoc,) = entries(tmp_path)
    divergence(model, original, "docs")
    (docs,) = entries(tmp_path) - {pydoc}
    shutil.copy(docs, pydoc)  # same shapes, another text: a model checked against itself would fail
    with caplog.at_level(logging.WARNING, logger="surgery"):
        assert divergence(model, original, "pydoc")[f"divergence.pydoc.kl@{LENGTH}"] < 1e-9
    assert "its text differs" in caplog.text


def test_statistics_from_another_library_version_are_not_reused(models, tmp_path, monkeypatch, caplog):
    original, other = models
    model, _ = surgery.load_model(str(other), dtype="float32")
    divergence(model, original)
    (old,) = entries(tmp_path)
    real = surgery.keys.versions()
    monkeypatch.setattr(surgery.keys, "versions", lambda: {**real, "transformers": "9.9.9"})
    loads = []
    load = surgery.models.load_model
    monkeypatch.setattr(surgery.models, "load_model", lambda *a, **k: loads.append(a) or load(*a, **k))
    divergence(model, original)
    assert len(loads) == 1  # recomputed, under a new key
    (new,) = entries(tmp_path) - {old}
    shutil.copy(old, new)  # the old version's entry under the new name: its stored key says otherwise
    with caplog.at_level(logging.WARNING, logger="surgery"):
        divergence(model, original)
    assert len(loads) == 2 and "computed by transformers" in caplog.text and "(now 9.9.9)" in caplog.text


def test_a_check_result_is_reused_only_under_its_own_key(models, caplog):
    original, other = models
    e = make_eval("perplexity", lengths=[LENGTH], samples=1)
    model, tok = surgery.load_model(str(original), dtype="float32")
    key = original_key(str(original), e, "float32")
    result = e.run(model, tok)
    store(original_cache(key), key, result)
    assert cached_result(original_cache(key), key) == result
    other_key = original_key(str(other), e, "float32")
    shutil.copy(original_cache(key), original_cache(other_key))  # the original's numbers under another model
    with caplog.at_level(logging.WARNING, logger="surgery"):
        assert cached_result(original_cache(other_key), other_key) is None
    assert "its model differs" in caplog.text
    newer = {**key, "versions": {**key["versions"], "surgery_source": "0" * 16}}  # the eval's code changed
    shutil.copy(original_cache(key), original_cache(newer))
    assert cached_result(original_cache(newer), newer) is None
    original_cache(key).write_text(result.model_dump_json())  # an entry without its key (older surgery)
    assert cached_result(original_cache(key), key) is None


def test_the_check_says_when_it_reuses_the_originals_results(models, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from surgery.cli import main

    original, _ = models
    monkeypatch.chdir(tmp_path)  # the reports go to ./NAME-check
    for name in ("copy", "copy2"):
        shutil.copytree(original, tmp_path / name)  # two candidates against the same original
    first = CliRunner().invoke(main, ["check", str(original), str(tmp_path / "copy"), "--length", "128"])
    assert first.exit_code == 0 and "reused from the cache" not in first.output, first.output
    second = CliRunner().invoke(main, ["check", str(original), str(tmp_path / "copy2"), "--length", "128"])
    assert second.exit_code == 0, second.output
    assert "original: reference statistics on pydoc reused from the cache" in second.output
    assert "original: reference statistics on docs reused from the cache" in second.output


def test_a_converted_gguf_copied_from_another_file_is_refused(tmp_path, monkeypatch, caplog):
    from surgery.export import export_gguf
    from surgery.models import _gguf_cache_path, cached_conversion, local_dir, resolve
    from tests.test_deploy_hostile import byte_bpe

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    files = []
    for seed in (0, 7):
        surgery.save(tiny_model("llama", seed=seed), byte_bpe(), tmp_path / f"m{seed}")
        files.append(export_gguf(tmp_path / f"m{seed}", tmp_path / f"m{seed}.gguf", type="f32").path)
    a, b = (local_dir(resolve(str(f))) for f in files)
    assert cached_conversion(files[0], a) and cached_conversion(files[1], b)
    shutil.rmtree(b)
    shutil.copytree(a, b)  # the poisoning: b's cache entry holds a's weights
    with caplog.at_level(logging.WARNING, logger="surgery"):
        assert not cached_conversion(files[1], b)
        again = local_dir(resolve(str(files[1])))
    assert again == _gguf_cache_path(files[1]) and cached_conversion(files[1], again)
    stored = json.loads((again / "surgery-source.json").read_text())["key"]
    assert stored["gguf"] == str(files[1].resolve())
    assert "refusing the converted cache" in caplog.text and "its gguf differs" in caplog.text


def test_mismatch_names_the_field():
    key = {"model": {"files": [["a", 1, 2]]}, "versions": {"torch": "2.13.0"}, "text": "pydoc"}
    assert mismatch(key, key) is None
    assert mismatch(None, key).startswith("it carries no key")
    assert mismatch({**key, "text": "docs"}, key) == 'its text differs ("docs", expected "pydoc")'
    assert mismatch({**key, "versions": {"torch": "2.12.0"}}, key) == "it was computed by torch 2.12.0 (now 2.13.0)"
    assert mismatch({**key, "model": {"files": []}}, key) == "its model differs (files)"
