"""Cache keys: everything a cached number depends on, stored inside the entry and compared on read.

A cache entry's file name is a digest of its key, but a name proves nothing: a file copied over
another entry (the statistics of another model, text or domain), or written by another version of
surgery, transformers or torch, would be read as if it were the right one. So every entry carries
its full key, and a reader that finds a key other than the one it asked for refuses the entry and
says which field differs. The versions include a digest of surgery's own source, so a changed eval
never reuses numbers the old code computed."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any


@functools.cache
def versions() -> dict[str, str]:
    """The code that computes cached numbers: surgery (version and a digest of its source),
    transformers and torch."""
    source = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        source.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    out = {"surgery": _version("surgery"), "surgery_source": source.hexdigest()[:16]}
    for package in ("transformers", "torch"):
        out[package] = _version(package)
    return out


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def digest(key: dict[str, Any], size: int = 24) -> str:
    """A file name for an entry with this key."""
    return hashlib.sha256(canonical(key).encode()).hexdigest()[:size]


def canonical(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def mismatch(stored: Any, expected: dict[str, Any]) -> str | None:
    """Why an entry whose stored key is `stored` is not the entry for `expected` (None when it
    is): the first differing field, e.g. "its model differs" or "its transformers is 5.1 (now 5.2)"."""
    if not isinstance(stored, dict):
        return "it carries no key (written by an older surgery, or not by surgery)"
    stored = json.loads(canonical(stored))  # both sides as JSON would hold them
    expected = json.loads(canonical(expected))
    for field in sorted(set(stored) | set(expected)):
        if stored.get(field) == expected.get(field):
            continue
        a, b = stored.get(field), expected.get(field)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            if field == "versions" and inner:
                k = inner[0]
                return f"it was computed by {k} {a.get(k)} (now {b.get(k)})"
            return f"its {field} differs ({', '.join(inner[:3])})"
        return f"its {field} differs ({_short(a)}, expected {_short(b)})"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
