"""divergence: exact KL against an independent full log-softmax computation, the compact top-k
reference within its stated bounds, the reference cache, and the KV-cache path."""

from __future__ import annotations

import json

import pytest
import torch

import surgery
from surgery.errors import SurgeryError
from surgery.evaluate import make_eval
from surgery.evaluate.divergence import compare_exact, compare_topk, topk_stats
from surgery.patch import make_patch
from tests.conftest import char_tokenizer, tiny_model

LENGTH = 300


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture
def reference(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "reference"
    tiny_model("llama", max_position_embeddings=512).save_pretrained(path)
    return path


def run(model, tok, reference, **params):
    params = {"reference": str(reference), "length": LENGTH, "samples": 2, **params}
    return make_eval("divergence", **params).run(model, tok)


@pytest.mark.parametrize("top_k", [0, 16])
def test_self_divergence_is_zero(tok, reference, top_k):
    model, _ = surgery.load_model(str(reference), dtype="float32")
    m = run(model, tok, reference, top_k=top_k).metrics
    assert m[f"divergence.pydoc.kl@{LENGTH}"] == 0.0 and m[f"divergence.pydoc.kl_max@{LENGTH}"] == 0.0
    assert m[f"divergence.pydoc.top1@{LENGTH}"] == 1.0
    assert m[f"divergence.pydoc.ppl_ratio@{LENGTH}"] == pytest.approx(1.0, abs=1e-9)


def test_exact_kl_matches_full_log_softmax(tok, reference):
    other = tiny_model("llama", seed=7, max_position_embeddings=512)
    e = make_eval("divergence", reference=str(reference), length=LENGTH, samples=2, top_k=0)
    result = e.run(other, tok)
    # independent computation: the stock forward's logits, torch's kl_div, the reference loaded by transformers
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    ids = e.windows(tok)
    with torch.no_grad():
        logp = torch.log_softmax(ref(ids).logits[:, :-1].double(), -1)
        logq = torch.log_softmax(other(ids).logits[:, :-1].double(), -1)
    kl = torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
    agree = (logp.argmax(-1) == logq.argmax(-1)).double().mean()
    target = ids[:, 1:, None]
    ratio = torch.exp((logp.gather(-1, target) - logq.gather(-1, target)).mean())
    m = result.metrics
    assert m[f"divergence.pydoc.kl@{LENGTH}"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert m[f"divergence.pydoc.kl_max@{LENGTH}"] == pytest.approx(kl.max().item(), rel=1e-5)
    assert m[f"divergence.pydoc.kl_median@{LENGTH}"] == pytest.approx(kl.flatten().quantile(0.5).item(), rel=1e-4)
    assert m[f"divergence.pydoc.top1@{LENGTH}"] == pytest.approx(agree.item())
    assert m[f"divergence.pydoc.ppl_ratio@{LENGTH}"] == pytest.approx(ratio.item(), rel=1e-5)
    low, high = result.intervals[f"divergence.pydoc.kl@{LENGTH}"]
    assert low < m[f"divergence.pydoc.kl@{LENGTH}"] < high
    assert result.counts[f"divergence.pydoc.kl@{LENGTH}"] == 4  # two 299-position windows, two 128-position blocks each


@pytest.mark.parametrize("k", [1, 4, 16, 64])
@pytest.mark.parametrize("sharpness", [1.0, 8.0])
def test_topk_reference_bounds_exact_kl(k, sharpness):
    """Per position: KL_k <= exact KL <= KL_hi, for flat and peaked distributions."""
    g = torch.Generator().manual_seed(k)
    logp = torch.log_softmax(torch.randn(3, 50, 128, generator=g) * sharpness, -1)
    logq = torch.log_softmax(logp * 0.7 + torch.randn(3, 50, 128, generator=g), -1)
    targets = torch.randint(0, 128, (3, 50), generator=g)
    exact = compare_exact(logp, logq, targets)["kl"]
    approx = compare_topk(topk_stats(logp, targets, k), logq, targets)
    assert (approx["kl"] <= exact + 1e-5).all()
    assert (approx["kl_hi"] >= exact - 1e-5).all()
    full = compare_topk(topk_stats(logp, targets, 128), logq, targets)
    torch.testing.assert_close(full["kl"], exact, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(full["kl_hi"], exact, atol=1e-5, rtol=1e-4)


def test_topk_bound_on_models_and_gap_reported(tok, reference):
    other = tiny_model("llama", seed=7, max_position_embeddings=512)
    exact = run(other, tok, reference, top_k=0).metrics[f"divergence.pydoc.kl@{LENGTH}"]
    approx = run(other, tok, reference, top_k=16).metrics
    low, gap = approx[f"divergence.pydoc.kl@{LENGTH}"], approx[f"divergence.pydoc.kl_gap@{LENGTH}"]
    assert low <= exact <= low + gap + 1e-6 and gap > 0


def test_sdpa_and_eager_agree(tok, reference):
    model, _ = surgery.load_model(str(reference), dtype="float32")
    make_patch("attention", impl="eager").apply(model)
    m = run(model, tok, reference, top_k=0).metrics
    assert m[f"divergence.pydoc.kl@{LENGTH}"] < 1e-6 and m[f"divergence.pydoc.top1@{LENGTH}"] == 1.0


def test_reference_statistics_are_cached(tok, reference, monkeypatch, tmp_path):
    other = tiny_model("llama", seed=7, max_position_embeddings=512)
    first = run(other, tok, reference, top_k=16)
    files = list((tmp_path / "cache" / "reference").glob("*.safetensors"))
    assert len(files) == 1

    def no_load(*args, **kwargs):
        raise AssertionError("the reference model was loaded again")

    monkeypatch.setattr("surgery.models.load_model", no_load)
    assert run(other, tok, reference, top_k=16).metrics == first.metrics
    with pytest.raises(AssertionError, match="loaded again"):  # other windows: another cache entry
        run(other, tok, reference, top_k=16, samples=1)
    monkeypatch.undo()
    files[0].write_bytes(b"torn")  # a torn cache file is recomputed, not trusted
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    assert run(other, tok, reference, top_k=16).metrics == first.metrics


def test_chunked_run_reads_the_quantized_cache(tok, reference):
    model, _ = surgery.load_model(str(reference), dtype="float32")
    plain = run(model, tok, reference, top_k=0, chunk=64).metrics[f"divergence.pydoc-chunk64.kl@{LENGTH}"]
    make_patch("kv-quant", bits=2, residual=8, group_size=8).apply(model)
    single = run(model, tok, reference, top_k=0).metrics[f"divergence.pydoc.kl@{LENGTH}"]
    chunked = run(model, tok, reference, top_k=0, chunk=64).metrics[f"divergence.pydoc-chunk64.kl@{LENGTH}"]
    # a full-precision cache read back in chunks changes nothing; one pass never reads the cache;
    # the 2-bit cache read back does (the random tiny model's distributions are near-flat, so KL is small)
    assert plain < 1e-7 and single < 1e-7 and chunked > 1e-5


def test_needs_a_reference(tok):
    with pytest.raises(SurgeryError, match="reference=MODEL"):
        make_eval("divergence", length=LENGTH, samples=1).run(tiny_model("llama", max_position_embeddings=512), tok)


def test_kl_curve_covers_the_window(tok, reference):
    other = tiny_model("llama", seed=3, max_position_embeddings=512)
    curve = run(other, tok, reference, top_k=0, buckets=8).details["kl_by_position"]
    assert len(curve) == 8 and curve[0][0] < curve[-1][0] < LENGTH
    assert all(kl > 0 and 0 <= agree <= 1 for _, kl, agree in curve)


def test_cached_statistics_are_checked_before_use(tok, reference, tmp_path):
    """A cache file that parses but does not fit (NaN, wrong dtype, ids out of range or repeated,
    probabilities over 1, wrong shape, a missing tensor) is recomputed, never used."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    other = tiny_model("llama", seed=7, max_position_embeddings=512)
    first = run(other, tok, reference, top_k=16).metrics
    (path,) = (tmp_path / "cache" / "reference").glob("*.safetensors")
    good = load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()  # the entry's own key: these files are refused for their content
    spoiled = [
        {**good, "topk_logp": torch.full_like(good["topk_logp"], float("nan"))},
        {**good, "target_logp": good["target_logp"].long()},
        {**good, "topk_logp": torch.zeros_like(good["topk_logp"]) + 0.5},
        {**good, "topk_ids": good["topk_ids"] + 1000},
        {**good, "topk_ids": good["topk_ids"][..., :1].expand_as(good["topk_ids"]).contiguous()},  # one token k times
        {**good, "topk_logp": torch.full_like(good["topk_logp"], -0.5)},  # 16 x 0.61: more than probability 1
        {**good, "topk_logp": good["topk_logp"][:1].contiguous()},
        {k: v for k, v in good.items() if k != "target_logp"},
    ]
    for stats in spoiled:
        save_file(stats, str(path), metadata=metadata)
        assert run(other, tok, reference, top_k=16).metrics == first


def test_a_token_the_reference_rules_out_keeps_the_kl_and_its_gradient_finite():
    """A masked vocabulary entry (-inf logit) in the reference: probability 0 counts 0, not NaN."""
    from surgery.evaluate.divergence import lumped_kl, topk_stats

    logits = torch.randn(1, 4, 8)
    logits[..., -2:] = float("-inf")  # padding the reference never predicts
    stats = topk_stats(torch.log_softmax(logits, -1), torch.zeros(1, 4, dtype=torch.long), 8)
    student = torch.randn(1, 4, 8, requires_grad=True)
    kl = lumped_kl(stats["topk_ids"].long(), stats["topk_logp"], torch.log_softmax(student, -1))[0]
    kl.sum().backward()
    exact = torch.nn.functional.kl_div(
        torch.log_softmax(student, -1)[..., :6],
        torch.log_softmax(logits, -1)[..., :6],
        log_target=True,
        reduction="none",
    )
    assert torch.isfinite(student.grad).all() and kl.sum().item() > 0
    assert kl.detach().flatten().tolist() == pytest.approx(exact.detach().sum(-1).flatten().tolist(), rel=1e-4)


def test_top_k_beyond_the_vocabulary_is_exact(tok, reference):
    other = tiny_model("llama", seed=7, max_position_embeddings=512)
    wide = run(other, tok, reference, top_k=500).metrics
    exact = run(other, tok, reference, top_k=0).metrics
    assert wide[f"divergence.pydoc.kl@{LENGTH}"] == pytest.approx(exact[f"divergence.pydoc.kl@{LENGTH}"], rel=1e-4)
    assert wide[f"divergence.pydoc.kl_gap@{LENGTH}"] < 1e-6


def test_unwritable_cache_still_evaluates(tok, reference, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("SURGERY_CACHE", str(blocker))
    other = tiny_model("llama", seed=7, max_position_embeddings=512)
    assert run(other, tok, reference, top_k=16).metrics[f"divergence.pydoc.kl@{LENGTH}"] > 0


def test_a_top_k_kl_far_below_its_bound_is_flagged_and_gated_by_the_bound(tmp_path, monkeypatch):
    """Against a distant reference the top-k KL is a lower bound far below the truth: its terminal
    line and report say so, and a `max` gate on it reads the upper bound (a gate that the lower
    bound would pass fails)."""
    from click.testing import CliRunner

    from surgery.cli import main

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    for name, seed in (("ref", 0), ("far", 5)):
        surgery.save(tiny_model("llama", seed=seed, max_position_embeddings=512), char_tokenizer(), tmp_path / name)
    spec = f"divergence reference={tmp_path / 'ref'} length=128 samples=2 top_k=2"
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "far"), "--eval", spec, "-o", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "divergence.pydoc.kl@128 =" in x)
    metrics = json.loads((tmp_path / "e" / "results.json").read_text())["results"][0]["metrics"]
    kl, hi = metrics["divergence.pydoc.kl@128"], metrics["divergence.pydoc.kl_hi@128"]
    assert hi > 2 * kl + 0.01  # the case the warning is for
    assert "WARNING: a lower bound" in line and f"{hi:.4g}" in line and "top_k=0" in line
    assert "(lower bound)" in (tmp_path / "e" / "report.md").read_text()
    limit = (kl + hi) / 2  # above the lower bound, below the upper one
    gate = f"divergence.pydoc.kl@128:max={limit}"
    compared = CliRunner().invoke(main, ["compare", str(tmp_path / "e"), str(tmp_path / "e"), "--gate", gate])
    assert compared.exit_code == 1, compared.output  # read from kl_hi: fails
    assert "the upper bound of the top-k KL" in compared.output
