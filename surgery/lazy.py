"""Heavy modules bound at import, loaded at first use: `surgery --help`, `list`, `validate` and
`inspect` never pay for torch (seconds) when they do not touch a tensor.

    from surgery.lazy import torch   # a stand-in; `torch.float16` imports torch the first time

Type checkers see the real module (the stand-in is typed as it). After the first attribute read
the stand-in holds the real module's names, so later reads cost what a module attribute costs."""

from __future__ import annotations

import importlib
import types
from typing import TYPE_CHECKING, Any


class LazyModule(types.ModuleType):
    """A module that is imported the first time one of its attributes is read."""

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)  # later reads find the names here, without __getattr__
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"


if TYPE_CHECKING:
    import torch
else:
    torch = LazyModule("torch")

__all__ = ["LazyModule", "torch"]
