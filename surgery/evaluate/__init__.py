"""Evaluations run on the in-memory (patched) model. Importing registers the built-in evals."""

from surgery.evaluate import harness, needle, perplexity, speed  # noqa: F401
from surgery.evaluate.base import EVALS, Eval, EvalResult, get_eval, make_eval, register

__all__ = ["EVALS", "Eval", "EvalResult", "get_eval", "make_eval", "register"]
