"""Evaluations run on the in-memory (patched) model. Importing registers the built-in evals."""

from surgery.evaluate import divergence, harness, needle, perplexity, ruler, speed  # noqa: F401
from surgery.evaluate.base import EVALS, Eval, EvalResult, get_eval, make_eval, register


def run(model, tokenizer, name: str, **params) -> EvalResult:
    """Run one registered eval (`perplexity`, `needle`, `harness`, `speed`) on a loaded model."""
    return make_eval(name, **params).run(model, tokenizer)


__all__ = ["EVALS", "Eval", "EvalResult", "get_eval", "make_eval", "register", "run"]
