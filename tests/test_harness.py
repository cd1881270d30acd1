"""lm-eval on the in-memory model: shipped offline tasks, pass-through errors, agreement with our
perplexity on the embedded model."""

from __future__ import annotations

import math

import pytest

import surgery
from surgery.errors import SurgeryError
from surgery.evaluate import make_eval
from surgery.evaluate.base import higher_is_better
from surgery.evaluate.harness import cloze_docs, make_lm
from tests.conftest import char_tokenizer, tiny_model


def test_offline_cloze_task_runs_without_network(no_network):
    """lm-eval's numbers equal a direct computation: per document, the target's log-likelihood after
    its context, and whether every target token is the greedy choice."""
    import torch

    model, tokenizer = tiny_model("llama", max_position_embeddings=1024), char_tokenizer()
    result = make_eval("harness", tasks="surgery_cloze", limit=3).run(model, tokenizer)
    assert set(result.metrics) == {"harness.surgery_cloze.acc", "harness.surgery_cloze.perplexity"}
    assert result.details["n_samples"]["surgery_cloze"]["effective"] == 3
    greedy, loglik = [], []
    with torch.no_grad():
        for doc in cloze_docs()[:3]:
            context = tokenizer(doc["context"], add_special_tokens=False).input_ids
            target = torch.tensor(tokenizer(doc["target"], add_special_tokens=False).input_ids)
            logp = model(torch.tensor([context + target.tolist()])).logits.log_softmax(-1)[0, len(context) - 1 : -1]
            loglik.append(logp.gather(-1, target[:, None]).sum().item())
            greedy.append(bool((logp.argmax(-1) == target).all()))
    assert result.metrics["harness.surgery_cloze.acc"] == sum(greedy) / 3
    assert result.metrics["harness.surgery_cloze.perplexity"] == pytest.approx(math.exp(-sum(loglik) / 3), rel=1e-4)


def test_cloze_docs_are_held_out_prose():
    docs = cloze_docs()
    assert len(docs) > 100
    assert all(d["target"].startswith(" ") and d["target"][1:].isalpha() for d in docs)
    assert docs == cloze_docs()  # deterministic


def test_unknown_task_is_a_user_error():
    with pytest.raises(SurgeryError, match="harness: unknown lm-eval task"):
        make_eval("harness", tasks=["no_such_task_anywhere"], limit=1).run(tiny_model("llama"), char_tokenizer())


def test_metric_directions():
    assert higher_is_better("harness.surgery_cloze.acc")
    assert not higher_is_better("harness.surgery_rolling.word_perplexity")
    assert not higher_is_better("harness.lambada_openai.perplexity")
    assert not higher_is_better("perplexity.ppl@2048")
    assert higher_is_better("needle.acc@4096")


@pytest.mark.slow
def test_our_perplexity_matches_lm_eval_rolling_loglikelihood():
    from lm_eval.api.instance import Instance

    model, tokenizer = surgery.load_model("smollm2", dtype="float32")
    e = make_eval("perplexity", lengths=[1024])
    ours = e.run(model, tokenizer).metrics["perplexity.ppl@1024"]
    text = tokenizer.decode(e.windows(tokenizer)[0, 1:])
    lm = make_lm(model, tokenizer, max_length=1024)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    loglikelihood = lm.loglikelihood_rolling([request], disable_tqdm=True)[0]
    theirs = math.exp(-loglikelihood / len(lm.tok_encode(text)))
    assert ours == pytest.approx(theirs, rel=0.01)
