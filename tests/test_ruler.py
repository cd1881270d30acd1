"""RULER tasks: deterministic generators, exact prompt lengths, references in the prompt, RULER's
string_match_all scoring, end-to-end runs through an oracle and a tiny model, and the heatmaps."""

from __future__ import annotations

import collections

import pytest
import torch
from tokenizers import decoders

import surgery.evaluate.ruler  # noqa: F401  (registers the eval)
from surgery.errors import InvalidParams, SurgeryError
from surgery.evaluate.base import make_eval
from surgery.evaluate.ruler import TASKS, WORDS, Ruler, plot_ruler, score
from surgery.evaluate.stats import samples_for_halfwidth
from tests.conftest import char_tokenizer, tiny_model

LENGTHS = [1000, 1400]  # char tokens: long enough for every task's template, needles and list


@pytest.fixture(scope="module")
def tok():
    t = char_tokenizer()
    t.backend_tokenizer.decoder = decoders.Fuse()  # decode to the exact text (no spaces between chars)
    return t


@pytest.fixture(scope="module")
def small() -> Ruler:
    return make_eval("ruler", lengths=LENGTHS, depths=[0.1, 0.9], trials=2, seed=3)


@pytest.fixture(scope="module")
def hay(small, tok):
    return small.haystack_tokens(tok)


@pytest.mark.parametrize("task", TASKS)
def test_generators_are_deterministic_by_seed(task, small, tok, hay):
    ids, refs = small.sample(tok, task, 1000, 0.1, 0, hay)
    again, refs_again = make_eval("ruler", lengths=LENGTHS, depths=[0.1, 0.9], trials=2, seed=3).sample(
        tok, task, 1000, 0.1, 0, hay
    )
    assert torch.equal(ids, again) and refs == refs_again
    other, other_refs = make_eval("ruler", lengths=LENGTHS, seed=4).sample(tok, task, 1000, 0.1, 0, hay)
    assert not torch.equal(ids, other) and refs != other_refs
    # another trial and another grid (more depths, more trials) do not shift this cell's keys
    assert small.sample(tok, task, 1000, 0.1, 1, hay)[1] != refs
    wider = make_eval("ruler", lengths=[1000, 2000], depths=[0.1, 0.5, 0.9], trials=5, seed=3)
    assert wider.sample(tok, task, 1000, 0.1, 0, hay)[1] == refs
    assert small.sample(tok, task, 1400, 0.1, 0, hay)[1] == refs  # same keys at every length


@pytest.mark.parametrize("task", TASKS)
def test_prompts_have_exact_length_and_contain_the_references(task, small, tok, hay):
    for n, d, t in [(n, d, t) for n in [*LENGTHS, 1237] for d in small.depths for t in range(2)]:
        ids, refs = small.sample(tok, task, n, d, t, hay)
        assert ids.dtype == torch.long and len(ids) == n and ids[0].item() == tok.bos_token_id
        text = tok.decode(ids, skip_special_tokens=True)
        assert refs and all(r in text for r in refs), (refs, text)
    unpadded = make_eval("ruler", lengths=[1000], bos=False).sample(tok, task, 1000, 0.5, 0, hay)[0]
    assert len(unpadded) == 1000 and unpadded[0].item() != tok.bos_token_id


def test_niah_templates_and_depth(small, tok, hay):
    ids, refs = small.sample(tok, "niah_single", 1400, 0.9, 0, hay)
    text = tok.decode(ids, skip_special_tokens=True)
    assert len(refs) == 1 and len(refs[0]) == 7 and refs[0].isdigit()
    assert text.startswith("A special magic number is hidden within the following text.")
    key = text.split("One of the special magic numbers for ")[1].split(" is: ")[0]
    assert f"One of the special magic numbers for {key} is: {refs[0]}." in text
    assert text.endswith(
        f"What is the special magic number for {key} mentioned in the provided text?"
        f" The special magic number for {key} mentioned in the provided text is"
    )
    start, end = text.index("afterwards.\n") + len("afterwards.\n"), text.index("\nWhat is")
    assert 0.8 < (text.index(" One of the special") - start) / (end - start) < 1.0

    ids, refs = small.sample(tok, "niah_multikey", 1400, 0.1, 0, hay)
    text = tok.decode(ids, skip_special_tokens=True)
    assert len(refs) == 1 and text.count("One of the special magic numbers for") == 4
    ids, refs = small.sample(tok, "niah_multivalue", 1400, 0.1, 0, hay)
    text = tok.decode(ids, skip_special_tokens=True)
    assert len(set(refs)) == 4 and "What are all the special magic numbers for" in text
    assert text.endswith("mentioned in the provided text are")
    ids, refs = small.sample(tok, "niah_multiquery", 1400, 0.1, 0, hay)
    text = tok.decode(ids, skip_special_tokens=True)
    question = text[text.index("What are all") :]
    assert len(refs) == 4 and question.count("-") >= 4 and ", and " in question


def test_vt_chain_is_in_order(small, tok, hay):
    ids, names = small.sample(tok, "vt", 1400, 0.3, 0, hay)
    text = tok.decode(ids, skip_special_tokens=True)
    assert len(names) == 5 and all(len(n) == 5 and n.isupper() and n.isalpha() for n in names)
    value = text.split(f"VAR {names[0]} = ")[1][:5]
    assert value.isdigit()
    where = [text.index(f"VAR {names[0]} = {value}")]
    where += [text.index(f"VAR {names[j + 1]} = VAR {names[j]}") for j in range(4)]
    assert where == sorted(where)
    assert text.endswith(f"5 variables are assgined the value {value}, they are:")


@pytest.mark.parametrize("length", [1000, 1400, 4100])
def test_cwe_common_words_are_the_most_frequent(length, small, tok, hay):
    ids, common = small.sample(tok, "cwe", length, 0.5, 0, hay)
    text = tok.decode(ids, skip_special_tokens=True)
    listing = text[text.index("often.\n") + len("often.\n") : text.index("\nQuestion:")].split()
    counts = collections.Counter(w for w in listing if w in WORDS)
    top = counts.most_common()
    assert len(common) == 10 and {w for w, _ in top[:10]} == set(common)
    assert top[9][1] > 2 * top[10][1]  # 6 vs 1 below 4096 tokens, 30 vs 3 from 4096 on
    numbers = [w for w in listing if w.endswith(".") and w[:-1].isdigit()]
    assert numbers[:3] == ["1.", "2.", "3."] and len(numbers) > 50


def test_score_is_string_match_all():
    assert score("The numbers are 1234567 and 7654321", ["1234567", "7654321"]) == 1.0
    assert score("The number is 1234567.", ["1234567", "7654321"]) == 0.5
    assert score("1. Apple 2. RIVER", ["apple", "river", "stone", "cloud"]) == 0.5
    assert score("", ["1234567"]) == 0.0
    assert score("123456", ["1234567"]) == 0.0
    with pytest.raises(ValueError):
        score("anything", [])


def test_default_grid_has_enough_prompts_per_metric():
    e = make_eval("ruler")
    assert e.tasks == list(TASKS) and e.lengths == [4096]
    assert e.trials * len(e.depths) >= samples_for_halfwidth(0.15) == 43


def test_validation(tok, hay):
    with pytest.raises(InvalidParams, match="unknown ruler task 'nope'"):
        make_eval("ruler", tasks=["nope"])
    with pytest.raises(InvalidParams, match="depths must be fractions"):
        make_eval("ruler", depths=[1.5])
    with pytest.raises(InvalidParams):
        make_eval("ruler", haystack="essay")
    assert make_eval("ruler", tasks="vt").tasks == ["vt"]
    e = make_eval("ruler", lengths=[200])
    for task in TASKS:
        with pytest.raises(SurgeryError, match=r"too short for the .* prompt; use at least \d+ tokens") as err:
            e.sample(tok, task, 200, 0.5, 0, hay)
        need = int(str(err.value).split("at least ")[1].split()[0])
        assert need > 200
        assert len(e.sample(tok, task, need, 0.5, 0, hay)[0]) == need  # the minimum is exact
    with pytest.raises(SurgeryError, match="use at least"):
        e.run(tiny_model("llama"), tok)  # fails before generating anything


class Oracle(torch.nn.Module):
    """A model whose greedy answer is `answer(prompt ids)`, tokenized and padded per batch."""

    def __init__(self, tok, answer):
        super().__init__()
        self.tok, self.answer = tok, answer
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[tuple[int, int]] = []

    def generate(self, ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        assert attention_mask.shape == ids.shape and not do_sample
        self.calls.append((ids.shape[1], max_new_tokens))
        rows = [self.tok(self.answer(row), add_special_tokens=False)["input_ids"] for row in ids]
        width = max(1, *map(len, rows))
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows], dtype=torch.long)
        return torch.cat([ids, new], 1)


def test_oracle_scores_one_and_silence_scores_zero(tok):
    e = make_eval("ruler", lengths=[1000, 1200], depths=[0.2, 0.6], trials=2, batch=3, haystack="filler")
    hay = e.haystack_tokens(tok)
    truth = {tuple(ids.tolist()): refs for ids, refs in (e.sample(tok, *c, hay) for c in e.cells())}
    oracle = Oracle(tok, lambda row: " " + ", ".join(truth[tuple(row.tolist())]) + ".")
    result = e.run(oracle, tok)
    expected = {f"ruler.{t}" for t in TASKS} | {f"ruler.{t}@{n}" for t in TASKS for n in (1000, 1200)}
    assert set(result.metrics) == expected | {"ruler.avg@1000", "ruler.avg@1200"}
    assert all(v == 1.0 for v in result.metrics.values())
    assert all(result.intervals[m][1] == 1.0 and result.counts[m] > 0 for m in result.metrics)
    assert result.counts["ruler.cwe@1000"] == 4 and result.counts["ruler.cwe"] == 8
    assert result.details["grid"]["vt"]["1200"] == {"0.2": 1.0, "0.6": 1.0}
    assert len(result.details["answers"]) == 6 * 2 * 4
    assert {len(row) for row in [oracle.calls]} and {n for n, _ in oracle.calls} == {1000, 1200}
    assert {m for _, m in oracle.calls} == {16, 64, 40, 120}

    silent = e.run(Oracle(tok, lambda row: ""), tok)
    assert all(v == 0.0 for v in silent.metrics.values())
    assert all(silent.intervals[m][0] == 0.0 for m in silent.metrics)

    half = e.run(Oracle(tok, lambda row: " " + truth[tuple(row.tolist())][0]), tok)
    assert half.metrics["ruler.niah_single"] == 1.0 and half.metrics["ruler.niah_multivalue"] == 0.25
    low, high = half.intervals["ruler.avg@1000"]
    assert low <= half.metrics["ruler.avg@1000"] <= high


def test_runs_on_a_tiny_model(tok):
    model = tiny_model("llama", max_position_embeddings=1024)
    e = make_eval("ruler", lengths=[1000], depths=[0.25, 0.75], trials=1, batch=2, max_new_tokens=4)
    result = e.run(model, tok)
    assert "ruler.avg@1000" in result.metrics and "ruler.cwe@1000" in result.metrics
    for metric, value in result.metrics.items():
        low, high = result.intervals[metric]
        assert 0.0 <= low <= value <= high <= 1.0
    assert set(result.details["grid"]) == set(TASKS)
    assert set(result.details["grid"]["niah_single"]["1000"]) == {"0.25", "0.75"}
    assert all(len(a["answer"]) <= 300 for a in result.details["answers"])


def test_plot_ruler_writes_a_png(tmp_path):
    grid = {t: {"1024": {"0.1": 1.0, "0.9": 0.5}, "4096": {"0.1": 0.25, "0.9": 0.0}} for t in TASKS}
    path = plot_ruler({"before": grid, "after yarn ×2": grid}, tmp_path / "ruler.png")
    assert path == tmp_path / "ruler.png" and path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000
    assert plot_ruler({}, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
