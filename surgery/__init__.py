"""surgery: rewrite loaded HuggingFace causal LMs in place, verify the effect, and save the result
as a plain checkpoint."""

from surgery import (
    evaluate,  # noqa: F401  (the subpackage: surgery.evaluate.run(...))
    patches,  # noqa: F401  (registers the built-in patches)
)
from surgery.errors import ModelNotFound, OutputExists, SurgeryError, UnsupportedModel
from surgery.evaluate import EVALS, EvalResult, make_eval
from surgery.hub import save
from surgery.models import load_config, load_model
from surgery.patch import PATCHES, Patch, PatchRecord, get_patch, make_patch, register
from surgery.routes import apply_to_checkpoint

__version__ = "0.1.0"


def apply(model, patch: str | Patch, tokenizer=None, **params) -> PatchRecord:
    """Apply a patch (an instance, or a registered name plus parameters) to `model` in place.
    `tokenizer` is used by data-aware patches for calibration text."""
    if isinstance(patch, str):
        patch = make_patch(patch, **params)
    elif params:
        raise TypeError("pass parameters either in the Patch instance or as keywords, not both")
    return patch.apply(model, tokenizer=tokenizer)


__all__ = [
    "PATCHES",
    "ModelNotFound",
    "OutputExists",
    "Patch",
    "PatchRecord",
    "SurgeryError",
    "UnsupportedModel",
    "EVALS",
    "EvalResult",
    "apply",
    "apply_to_checkpoint",
    "make_eval",
    "get_patch",
    "load_config",
    "load_model",
    "make_patch",
    "register",
    "save",
]
