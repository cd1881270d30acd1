"""Text for evaluation and healing. Offline domains every install has, each split deterministically
into train and held-out parts so an eval never scores text a fine-tune trained on: `pydoc` (the
default: the standard library's `pydoc_data.topics`, the Python language reference, ~113k SmolLM2
tokens of English prose), `docs` (docstrings of the installed torch and transformers) and
`licenses` (the licence texts the installed packages ship: legal English, a third domain to judge
a heal that trained on the other two). Users point at a local .txt / .jsonl file or any `datasets`
dataset (`hf:NAME[:CONFIG]`), and mix sources with '+'."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator

from surgery.errors import SurgeryError

Split = Literal["train", "heldout"]


def check_source(source: str) -> str:
    """A text source that can be read: pydoc, docs, hf:NAME[:CONFIG], an existing .txt/.jsonl
    file, or a mix of them joined by '+' (checked when parameters are validated, before any model
    is loaded)."""
    parts = mix_parts(source)
    if len(parts) > 1:
        same = [str(Path(p).expanduser().resolve()) if Path(p).expanduser().is_file() else p for p in parts]
        if len(set(same)) != len(same):  # also one file spelled two ways (a.txt, ./a.txt)
            raise ValueError(f"text mix '{source}' names a source twice")
        for part in parts:
            check_source(part)
        return source
    if source in NAMED or (source.startswith("hf:") and len(source) > 3):
        return source
    path = Path(source).expanduser()
    problem = file_problem(path, source)
    if problem:
        raise ValueError(problem)
    return source


MAX_TEXT_BYTES = 1 << 30  # a text file larger than this is refused, not read into memory (~250M tokens)


def file_problem(path: Path, source: str) -> str | None:
    """Why the file `source` (at `path`) cannot be a text source, as one sentence (None when it
    can): missing, a directory, a FIFO or a device (which would hang or never end), the wrong
    suffix, or too large to read."""
    use = "use pydoc, docs, licenses, a .txt or .jsonl file, or hf:NAME[:CONFIG]"
    if not path.exists():
        return f"no such text source '{source}'; {use}"
    if path.is_dir():
        return f"text source '{source}' is a directory; name a .txt or .jsonl file inside it"
    if not path.is_file():
        return f"text source '{source}' is not a regular file (a pipe, a socket or a device); save the text to a file"
    if path.suffix not in (".txt", ".jsonl"):
        return f"text source '{source}' is not a .txt or .jsonl file"
    size = path.stat().st_size
    if size > MAX_TEXT_BYTES:
        return (
            f"text source '{source}' is {size / 2**30:.1f} GiB, more than the {MAX_TEXT_BYTES >> 30} GiB surgery "
            "reads from one file; pass a part of it, or a dataset as hf:NAME"
        )
    return None


def join_mix(value: object) -> object:
    """A YAML list of sources is their mix: [pydoc, docs] -> 'pydoc+docs'. An element holding '+'
    is refused (it would read as two sources, or as a file named with '+' it could not)."""
    if isinstance(value, list | tuple):
        if not value or not all(isinstance(v, str) and v for v in value):
            raise ValueError("a text mix is a list of source names, e.g. [pydoc, docs]")
        if any("+" in v for v in value):
            raise ValueError("an element of a text mix list holds '+'; list each source once, e.g. [pydoc, docs]")
        return "+".join(value)
    return value


def mix_parts(source: str) -> list[str]:
    """The sources of a mix ('pydoc+docs'); a single source (a file whose name holds '+' too)."""
    if "+" not in source or Path(source).expanduser().is_file():
        return [source]
    return [part.strip() for part in source.split("+")]


TextSource = Annotated[str, BeforeValidator(join_mix), AfterValidator(check_source)]
HELDOUT_EVERY = 5  # one topic (or docstring) in five is held out
NAMED = ("pydoc", "docs", "licenses")  # the offline sources every install has


def text_label(source: str) -> str:
    """A short name for a text source in metric names and labels: pydoc, docs, the dataset name,
    or the file's stem (letters, digits, - and _ only)."""
    import re

    parts = mix_parts(source)
    if len(parts) > 1:
        return "+".join(text_label(part) for part in parts)
    name = source[3:].split(":")[0].split("/")[-1] if source.startswith("hf:") else source
    if source not in NAMED and not source.startswith("hf:"):
        name = Path(source).stem
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "text"


def components(source: str) -> set[str]:
    """The single sources a text (or a mix) reads, by label: what a fine-tune saw."""
    return {text_label(part) for part in mix_parts(source)}


def is_heldout(topic: str) -> bool:
    return int(hashlib.sha1(topic.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


def pydoc_topics_split(split: Split) -> list[str]:
    """The topics of one part, as separate documents, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics) if is_heldout(k) == (split == "heldout")]


def pydoc_text(split: Split) -> str:
    return "\n\n".join(pydoc_topics_split(split))


# The second offline domain: API documentation (docstrings) of the installed torch and
# transformers, read from their source files with `ast` (nothing is imported or run). Technical
# prose about tensors and models, unlike the language reference in pydoc.
DOCS_PACKAGES = {
    "torch": ("nn/modules", "optim", "utils/data", "distributions"),
    "transformers": ("generation", "pipelines", "."),
}
DOCS_MIN_CHARS = 300


def docs_split(split: Split) -> tuple[str, ...]:
    """The docstrings (at least DOCS_MIN_CHARS long) of one part, in a fixed order; a docstring is
    held out by a hash of its qualified name, so the split is stable across versions."""
    return _docs()[split == "heldout"]


@functools.lru_cache(maxsize=1)
def _docs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    import ast
    import importlib.util

    out: tuple[list[str], list[str]] = ([], [])
    for package, folders in DOCS_PACKAGES.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(spec.submodule_search_locations[0])
        for folder in folders:
            where = root / folder
            files = sorted(where.glob("*.py") if folder == "." else where.rglob("*.py"))
            for path in files:
                try:
                    tree = ast.parse(path.read_text(encoding="utf-8"))
                except (SyntaxError, UnicodeDecodeError, OSError):
                    continue
                module = f"{package}.{path.relative_to(root).with_suffix('').as_posix().replace('/', '.')}"
                nodes = [tree] + [
                    n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                ]
                for node in nodes:
                    doc = ast.get_docstring(node)
                    if not doc or len(doc) < DOCS_MIN_CHARS:
                        continue
                    name = f"{module}.{getattr(node, 'name', '')}"
                    out[is_heldout(name)].append(doc.strip())
    if not out[1]:
        raise SurgeryError("the docs text needs torch and transformers installed; use --text pydoc")
    # the same docstring under several names (copied, inherited) lands on both sides of a hash of
    # the name: train keeps only texts the held-out part does not have, once each
    held = set(out[1])
    train = [d for d in dict.fromkeys(out[0]) if d not in held]
    return tuple(train), tuple(out[1])


def licenses_split(split: Split) -> tuple[str, ...]:
    """The distinct licence texts of one part, in a fixed order; held out by a hash of the text."""
    return _licenses()[split == "heldout"]


LICENSE_NAMES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")


@functools.lru_cache(maxsize=1)
def _licenses() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Licence files listed in the installed distributions' RECORDs, read as text (nothing runs).
    The same licence shipped by several packages (its copyright lines and spacing aside) counts
    once, and the split hashes that normalized text, so one licence never sits on both sides."""
    import importlib.metadata
    import re

    texts: dict[str, str] = {}  # normalized -> the first text found
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        for f in sorted(dist.files or [], key=str):
            if not f.name.upper().startswith(LICENSE_NAMES) or f.suffix.lower() not in ("", ".txt", ".md", ".rst"):
                continue
            try:
                text = Path(dist.locate_file(f)).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                continue
            kept = [line for line in text.splitlines() if "copyright" not in line.lower()]
            key = re.sub(r"\s+", " ", " ".join(kept)).strip().lower()
            if len(text) >= DOCS_MIN_CHARS:
                texts.setdefault(key, text)
    out: tuple[list[str], list[str]] = ([], [])
    for key, text in texts.items():
        out[is_heldout(key)].append(text)
    if not out[1]:
        raise SurgeryError("no licence texts found in the installed packages; use --text pydoc or docs")
    return tuple(out[0]), tuple(out[1])


def load_text(source: str = "pydoc", split: Split = "heldout", field: str = "text") -> str:
    """The text of a source: `pydoc`, `docs`, a .txt or .jsonl path, `hf:NAME[:CONFIG]`, or a mix
    of them ('pydoc+docs'), its documents joined by blank lines."""
    return "\n\n".join(documents(source, split, field))


def documents(source: str, split: Split = "heldout", field: str = "text") -> list[str]:
    """The documents of a source in a fixed order: pydoc topics, docstrings, licences, .jsonl or
    dataset rows, a .txt file whole (its paragraphs when it is part of a mix). The named sources
    and datasets have disjoint train and held-out parts; a file has no split (both parts are the
    whole file: train and judge on separate files, as `validate` warns). A mix interleaves its
    sources' documents evenly (each source's documents spread over the whole in their own order),
    so any prefix of it, such as a calibration sample, holds every source in proportion to its size."""
    parts = mix_parts(source)
    if len(parts) > 1:
        docs = [documents(part, split, field) for part in parts]
        docs = [[x for x in d[0].split("\n\n") if x.strip()] if len(d) == 1 else d for d in docs]  # paragraphs
        spread = [((j + 0.5) / len(d), i, j) for i, d in enumerate(docs) for j in range(len(d))]
        return [docs[i][j] for _, i, j in sorted(spread)]
    if source == "pydoc":
        return pydoc_topics_split(split)
    if source == "docs":
        return list(docs_split(split))
    if source == "licenses":
        return list(licenses_split(split))
    if source.startswith("hf:"):
        return dataset_rows(source[3:], split, field)
    path = Path(source).expanduser()
    problem = file_problem(path, source)
    if problem:
        raise SurgeryError(problem)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SurgeryError(f"{path} is not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    except MemoryError:
        raise SurgeryError(
            f"{path} ({path.stat().st_size / 2**20:.0f} MiB) does not fit in the memory this process may use; "
            "pass a smaller part of it"
        ) from None
    except OSError as err:
        raise SurgeryError(f"cannot read {path}: {err.strerror}") from None
    if path.suffix == ".jsonl":
        return jsonl_rows(path, text, field)
    return [text]


def jsonl_rows(path: Path, text: str, field: str) -> list[str]:
    """The `field` of every row of a JSON-lines file."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise SurgeryError(f"{path}: line {number} is not JSON") from None
        if not isinstance(row, dict) or field not in row:
            raise SurgeryError(f"{path}: line {number} has no '{field}' field")
        out.append(str(row[field]))
    return out


def dataset_rows(spec: str, split: Split, field: str) -> list[str]:
    import datasets

    name, _, config = spec.partition(":")
    hf_split = "train" if split == "train" else "test"
    try:
        data = datasets.load_dataset(name, config or None, split=hf_split)
    except Exception as err:  # datasets raises many types for offline / missing / gated
        raise SurgeryError(
            f"could not load dataset '{name}' ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "check the name and your network, or use --text pydoc or a local file"
        ) from err
    if field not in data.column_names:
        raise SurgeryError(f"dataset '{name}' has no '{field}' column; it has {', '.join(data.column_names)}")
    return [t for t in data[field] if t]


def token_stream(tokenizer, text: str):
    """All tokens of `text` as one 1-D LongTensor, without special tokens, so every model compared
    sees exactly the same ids after an optional BOS."""
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_blocks(tokenizer, text: str, seq_len: int, split: Split = "train"):
    """(N, seq_len) consecutive token blocks of one split of `text`, in order."""
    ids = token_stream(tokenizer, load_text(text, split))
    n = ids.numel() // seq_len
    if n == 0:
        raise SurgeryError(f"the {split} text of {text} has {ids.numel()} tokens, fewer than {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)
