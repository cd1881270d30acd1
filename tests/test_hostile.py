"""Hostile input, as an attacker or a careless user would give it: every case must exit 2 with
exactly one line on stderr, no traceback, nothing written anywhere (not beside the target, not in
the source), and the source's bytes unchanged. Each case builds its input in a fresh directory
and returns the command line; the check is the same for all."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from surgery.cli import main
from tests.conftest import char_tokenizer, tiny_model


class World:
    """A directory with one tiny checkpoint (`src`, with a tokenizer) and helpers to spoil copies."""

    def __init__(self, root: Path, template: Path):
        self.root = root
        self.src = root / "src"
        os.system(f"cp -r '{template}' '{self.src}'")

    def copy(self, name: str = "bad") -> Path:
        dst = self.root / name
        os.system(f"cp -r '{self.src}' '{dst}'")
        return dst

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def recipe(self, text: str, name: str = "recipe.yaml") -> Path:
        return self.file(name, text.replace("SRC", str(self.src)).replace("ROOT", str(self.root)))

    def surgery_dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        (path / "surgery.json").write_text("{}")
        return path


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "tiny"
    tiny_model("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` with its content hash (directories as 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "other"
    return out


def edit_config(w: World, **changes) -> Path:
    bad = w.copy()
    config = json.loads((bad / "config.json").read_text())
    config.update(changes)
    (bad / "config.json").write_text(json.dumps(config))
    return bad


def truncated(w: World) -> Path:
    bad = w.copy()
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    return bad


def flipped_header(w: World) -> Path:
    bad = w.copy()
    data = bytearray((bad / "model.safetensors").read_bytes())
    for i in range(12, 40):
        data[i] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    return bad


def huge_header_length(w: World) -> Path:
    bad = w.copy()
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[:8] = struct.pack("<Q", 1 << 62)
    (bad / "model.safetensors").write_bytes(bytes(data))
    return bad


def alias_bomb() -> str:
    """A "billion laughs": 8 levels of 10 aliases, a few hundred bytes on disk, 10^8 values expanded."""
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    return "\n".join(lines) + "\nmodel: *a7\nsteps: [*a7]\n"


def bad_config(w: World, content: bytes) -> Path:
    bad = w.copy()
    (bad / "config.json").write_bytes(content)
    return bad


def nested(w: World) -> Path:
    """A copy of the source one directory down: models/tiny."""
    if not (w.root / "models" / "tiny").exists():
        (w.root / "models").mkdir()
        w.copy("models/tiny")
    return w.root / "models" / "tiny"


def foreign_dir(w: World, name: str) -> Path:
    """A directory surgery did not write: someone's notes in it."""
    (w.root / name).mkdir()
    (w.root / name / "notes.txt").write_text("mine")
    return w.root / name


def symlink(target: Path, link: Path) -> Path:
    link.symlink_to(target)
    return link


def saved_model(w: World, extra: dict[str, str] | None = None) -> Path:
    path = w.surgery_dir("m")
    (path / "config.json").write_text("{}")
    for name, text in (extra or {}).items():
        (path / name).write_text(text)
    return path


def rewritten(w: World, change) -> Path:
    """A copy of the source whose weights are `change(tensors)`."""
    from safetensors.torch import load_file, save_file

    bad = w.copy()
    tensors = load_file(bad / "model.safetensors")
    save_file(change(tensors), bad / "model.safetensors")
    return bad


def wrong_shape(w: World) -> Path:
    return rewritten(
        w, lambda t: {**t, "model.layers.0.self_attn.k_proj.weight": t["model.layers.0.self_attn.k_proj.weight"][:16]}
    )


def missing_tensor(w: World) -> Path:
    return rewritten(w, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})


def phantom_tensor(w: World) -> Path:
    bad = w.copy()
    index = {"metadata": {}, "weight_map": {"model.layers.9.bogus": "model.safetensors"}}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    return bad


def no_weights(w: World) -> Path:
    bad = w.copy()
    (bad / "model.safetensors").unlink()
    return bad


def no_tokenizer(w: World) -> Path:
    bad = w.copy()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bad / name).unlink(missing_ok=True)
    return bad


def missing_shard(w: World) -> Path:
    bad = w.copy()
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    return bad


def empty_weights(w: World) -> Path:
    bad = w.copy()
    (bad / "model.safetensors").write_bytes(b"")
    return bad


class Evil:
    """Unpickling this would run code; it must never be unpickled."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/surgery-pickle-ran",))


def pickle_only(w: World) -> Path:
    bad = w.copy()
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    return bad


def remote_code(w: World) -> Path:
    bad = edit_config(w, model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (bad / "configuration_evil.py").write_text("open('/tmp/surgery-code-ran', 'w').write('ran')\n")
    return bad


def remote_tokenizer(w: World) -> Path:
    bad = w.copy()
    config = json.loads((bad / "tokenizer_config.json").read_text())
    config.update(
        tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    )
    (bad / "tokenizer_config.json").write_text(json.dumps(config))
    (bad / "tokenization_evil.py").write_text("open('/tmp/surgery-code-ran', 'w').write('ran')\n")
    return bad


def results(w: World, name: str = "a.json") -> Path:
    return w.file(
        name, json.dumps({"model": "m", "results": [{"name": "perplexity", "params": {}, "metrics": {"x": 1.0}}]})
    )


APPLY = ["apply", "yarn", "--factor", "2"]
PPL = ["--eval", "perplexity lengths=16"]
Case = Callable[[World], list]

CASES: dict[str, tuple[str, Case]] = {
    # ---- patch parameters
    "unknown patch": ("did you mean 'yarn'", lambda w: ["apply", "yran", "--factor", "2", w.src]),
    "factor inf": ("finite number", lambda w: ["apply", "yarn", "--factor", "inf", w.src, "-o", w.root / "o"]),
    "factor nan": ("finite number", lambda w: ["apply", "yarn", "--factor", "nan", w.src, "-o", w.root / "o"]),
    "factor 1e308": ("less than or equal to 1024", lambda w: ["apply", "yarn", "--factor", "1e308", w.src]),
    "factor 1e300": ("less than or equal to 1024", lambda w: ["apply", "ntk", "--factor", "1e300", w.src]),
    "factor negative": ("greater than or equal to 1", lambda w: ["apply", "linear", "--factor", "-3", w.src]),
    "factor text": ("is not a valid float", lambda w: ["apply", "yarn", "--factor", "lots", w.src]),
    "factor missing": ("--factor: required", lambda w: ["apply", "yarn", w.src]),
    "beta overflow": ("--beta-fast", lambda w: [*APPLY, "--beta-fast", "1e999", w.src]),
    "llama3 freq inf": (
        "finite number",
        lambda w: ["apply", "llama3", "--factor", "2", "--low-freq-factor", "inf", w.src],
    ),
    "unknown option": ("No such option", lambda w: [*APPLY, "--factr", "2", w.src]),
    "window beyond context": ("would never slide", lambda w: ["apply", "sliding-window", "--window", "100000", w.src]),
    "window zero": ("--window", lambda w: ["apply", "sliding-window", "--window", "0", w.src]),
    "window layers repeated": (
        "distinct",
        lambda w: ["apply", "sliding-window", "--window", "8", "--layers", "0,0", w.src],
    ),
    "window layer missing": (
        "does not exist",
        lambda w: ["apply", "sliding-window", "--window", "8", "--layers", "7", w.src],
    ),
    "gqa heads not dividing": (
        "cannot pool the model's 2; possible: 1, 2",
        lambda w: ["apply", "gqa", "--num-kv-heads", "3", w.src],
    ),
    "gqa heads zero": ("--num-kv-heads", lambda w: ["apply", "gqa", "--num-kv-heads", "0", w.src]),
    "kv bits 3": ("'3' is not one of", lambda w: ["apply", "kv-quant", "--bits", "3", w.src]),
    "unknown dtype": ("unknown dtype", lambda w: [*APPLY, w.src, "--dtype", "float12"]),
    "gqa fit lr inf": ("finite number", lambda w: ["apply", "gqa", "--num-kv-heads", "1", "--fit-lr", "inf", w.src]),
    # ---- model references
    "missing model": ("no such file or directory", lambda w: [*APPLY, w.root / "nope"]),
    "model is a text file": ("not a .gguf", lambda w: [*APPLY, w.file("model.txt", "hi")]),
    "dir without config": ("without config.json", lambda w: [*APPLY, foreign_dir(w, "empty")]),
    "hub id offline": ("could not", lambda w: ["inspect", "nobody-xyz/none-such-model"]),
    # ---- inspect
    "context zero": ("between 1 and", lambda w: ["inspect", w.src, "--context", "0"]),
    "context words": ("bad context length", lambda w: ["inspect", w.src, "--context", "lots"]),
    "context negative": ("bad context length", lambda w: ["inspect", w.src, "--context", "-5"]),
    "context absurd": ("between 1 and", lambda w: ["inspect", w.src, "--context", "9999999m"]),
    "batch zero": ("--batch", lambda w: ["inspect", w.src, "--batch", "0"]),
    "kv dtype": ("unknown KV dtype", lambda w: ["inspect", w.src, "--kv-dtype", "int3"]),
    # ---- eval parameters (all checked before the model loads)
    "unknown eval": ("did you mean 'perplexity'", lambda w: ["eval", w.src, "--eval", "perplexiti"]),
    "eval key twice": ("given twice", lambda w: ["eval", w.src, "--eval", "perplexity lengths=16 lengths=32"]),
    "eval value": ("lengths", lambda w: ["eval", w.src, "--eval", "perplexity lengths=abc"]),
    "eval text not txt": ("not a .txt or .jsonl", lambda w: ["eval", w.src, "--eval", "perplexity text=/etc/passwd"]),
    "eval text missing": (
        "no such text source",
        lambda w: ["eval", w.src, "--eval", f"perplexity text={w.root}/x.txt"],
    ),
    "eval yaml tag": ("bad value", lambda w: ["eval", w.src, "--eval", "perplexity lengths=!!python/object:os.system"]),
    "eval dtype": ("unknown dtype", lambda w: ["eval", w.src, *PPL, "--dtype", "int7"]),
    # ---- outputs
    "force onto the source": ("is the source", lambda w: [*APPLY, w.src, "-o", w.src, "--force"]),
    "force onto the source, loaded": (
        "is the source",
        lambda w: [*APPLY, w.src, "-o", w.src, "--force", "--load-weights"],
    ),
    "force onto the source, streamed": (
        "is the source",
        lambda w: ["apply", "gqa", "--num-kv-heads", "1", w.src, "-o", w.src, "--force", "--streaming"],
    ),
    "force onto the source's parent": ("holds it", lambda w: [*APPLY, nested(w), "-o", nested(w).parent, "--force"]),
    "force onto cwd": ("working directory", lambda w: [*APPLY, w.src, "-o", ".", "--force"]),
    "force onto cwd's parent": ("working directory", lambda w: [*APPLY, w.src, "-o", "..", "--force"]),
    "force onto a foreign dir": (
        "not written by surgery",
        lambda w: [*APPLY, w.src, "-o", foreign_dir(w, "mine"), "--force"],
    ),
    "force onto a file": ("a file", lambda w: [*APPLY, w.src, "-o", w.file("out", "x"), "--force"]),
    "force onto a symlink": (
        "symbolic link",
        lambda w: [*APPLY, w.src, "-o", symlink(w.surgery_dir("real"), w.root / "link"), "--force"],
    ),
    "output inside the source": ("inside the source", lambda w: [*APPLY, w.src, "-o", w.src / "sub"]),
    "output under a file": ("Not a directory", lambda w: [*APPLY, w.src, "-o", w.file("f", "x") / "sub"]),
    "output not writable": ("cannot write in /sys", lambda w: [*APPLY, w.src, "-o", "/sys/surgery-out"]),
    "output name too long": ("File name too long", lambda w: [*APPLY, w.src, "-o", w.root / ("x" * 300)]),
    "output name empty": ("-o is empty", lambda w: [*APPLY, w.src, "-o", ""]),
    "eval output name empty": ("-o is empty", lambda w: ["eval", w.src, *PPL, "-o", " "]),
    "output exists": ("already exists", lambda w: [*APPLY, w.src, "-o", w.surgery_dir("done")]),
    "eval onto the source": ("is the source", lambda w: ["eval", w.src, *PPL, "-o", w.src, "--force"]),
    "eval onto cwd": ("working directory", lambda w: ["eval", w.src, *PPL, "-o", ".", "--force"]),
    "eval not writable": ("cannot write in /sys", lambda w: ["eval", w.src, *PPL, "-o", "/sys/surgery-eval"]),
    "eval output busy": ("another surgery process", lambda w: ["eval", w.src, *PPL, "-o", locked(w.root / "busy")]),
    "apply output busy": ("another surgery process", lambda w: [*APPLY, w.src, "-o", locked(w.root / "busy")]),
    "apply loaded output busy": (
        "another surgery process",
        lambda w: [*APPLY, w.src, "--load-weights", "-o", locked(w.root / "busy")],
    ),
    "gqa streamed output busy": (
        "another surgery process",
        lambda w: ["apply", "gqa", "--num-kv-heads", "1", "--streaming", w.src, "-o", locked(w.root / "busy")],
    ),
    # ---- broken checkpoints, on every route
    "config not json": ("not valid JSON", lambda w: [*APPLY, bad_config(w, b"{oops"), "-o", w.root / "o"]),
    "config a list": ("not an object", lambda w: [*APPLY, bad_config(w, b"[1]"), "-o", w.root / "o"]),
    "config not utf-8": ("not valid JSON", lambda w: [*APPLY, bad_config(w, b"\xff\xfe{"), "-o", w.root / "o"]),
    "config not json, inspect": ("not valid JSON", lambda w: ["inspect", bad_config(w, b"")]),
    "unknown model type": (
        "is not one transformers knows",
        lambda w: [*APPLY, edit_config(w, model_type="lama"), "-o", w.root / "o"],
    ),
    "no model type": ("has no model_type", lambda w: [*APPLY, edit_config(w, model_type=None), "-o", w.root / "o"]),
    "remote code, apply": ("needs custom code", lambda w: [*APPLY, remote_code(w), "-o", w.root / "o"]),
    "remote code, inspect": ("needs custom code", lambda w: ["inspect", remote_code(w)]),
    "remote code, eval": ("needs custom code", lambda w: ["eval", remote_code(w), *PPL, "-o", w.root / "o"]),
    "remote tokenizer, eval": (
        "tokenizer needs custom code",
        lambda w: ["eval", remote_tokenizer(w), *PPL, "-o", w.root / "o"],
    ),
    "truncated, config only": ("truncated", lambda w: [*APPLY, truncated(w), "-o", w.root / "o"]),
    "truncated, loaded": ("truncated", lambda w: [*APPLY, truncated(w), "-o", w.root / "o", "--load-weights"]),
    "truncated, streamed": (
        "truncated",
        lambda w: ["apply", "gqa", "--num-kv-heads", "1", truncated(w), "-o", w.root / "o", "--streaming"],
    ),
    "flipped header, config only": ("corrupt", lambda w: [*APPLY, flipped_header(w), "-o", w.root / "o"]),
    "flipped header, loaded": ("corrupt", lambda w: [*APPLY, flipped_header(w), "-o", w.root / "o", "--load-weights"]),
    "flipped header, eval": ("corrupt", lambda w: ["eval", flipped_header(w), *PPL, "-o", w.root / "o"]),
    "huge header length": ("corrupt or truncated", lambda w: [*APPLY, huge_header_length(w), "-o", w.root / "o"]),
    "empty weights file": ("truncated", lambda w: [*APPLY, empty_weights(w), "-o", w.root / "o", "--load-weights"]),
    "index names a missing shard": ("missing from", lambda w: [*APPLY, missing_shard(w), "-o", w.root / "o"]),
    "index names a missing shard, streamed": (
        "missing from",
        lambda w: ["apply", "gqa", "--num-kv-heads", "1", missing_shard(w), "-o", w.root / "o", "--streaming"],
    ),
    "pickle only, loaded": (
        "only pickle weights",
        lambda w: [*APPLY, pickle_only(w), "-o", w.root / "o", "--load-weights"],
    ),
    "pickle only, config only": ("only pickle weights", lambda w: [*APPLY, pickle_only(w), "-o", w.root / "o"]),
    "wrong tensor shape, config only": (
        "the weights do not match",
        lambda w: [*APPLY, wrong_shape(w), "-o", w.root / "o"],
    ),
    "wrong tensor shape, streamed": (
        "the weights do not match",
        lambda w: ["apply", "gqa", "--num-kv-heads", "1", wrong_shape(w), "-o", w.root / "o", "--streaming"],
    ),
    "missing tensor, loaded": (
        "lacks the tensor",
        lambda w: [*APPLY, missing_tensor(w), "-o", w.root / "o", "--load-weights"],
    ),
    "missing tensor, config only": ("lacks the tensor", lambda w: [*APPLY, missing_tensor(w), "-o", w.root / "o"]),
    "index names a tensor its shard lacks": (
        "does not hold it",
        lambda w: [*APPLY, phantom_tensor(w), "-o", w.root / "o"],
    ),
    "no weights at all": ("has no weights", lambda w: [*APPLY, no_weights(w), "-o", w.root / "o"]),
    "empty gguf": ("not a readable GGUF", lambda w: [*APPLY, w.file("empty.gguf", b""), "-o", w.root / "o"]),
    "random gguf": (
        "not a readable GGUF",
        lambda w: [*APPLY, w.file("noise.gguf", os.urandom(4096)), "-o", w.root / "o"],
    ),
    "eval without a tokenizer": ("has no tokenizer", lambda w: ["eval", no_tokenizer(w), *PPL, "-o", w.root / "o"]),
    # ---- compare
    "compare missing": ("no results file", lambda w: ["compare", w.root / "a.json", w.root / "b.json"]),
    "compare not json": (
        "not a surgery results file",
        lambda w: ["compare", w.file("a.json", "{nope"), results(w, "b.json")],
    ),
    "compare not utf-8": (
        "not a surgery results file",
        lambda w: ["compare", w.file("a.json", b"\xff\xfe"), results(w, "b.json")],
    ),
    "compare wrong schema": (
        "not a surgery results file",
        lambda w: ["compare", w.file("a.json", '{"x": 1}'), results(w, "b.json")],
    ),
    "compare bad gate": ("gate", lambda w: ["compare", results(w), results(w, "b.json"), "--gate", "x:frob=1"]),
    "compare onto its input": (
        "holds it",
        lambda w: ["compare", results(w, "in/a.json"), results(w, "b.json"), "-o", w.root / "in", "--force"],
    ),
    # ---- recipes
    "recipe inf": (
        "finite number",
        lambda w: ["validate", w.recipe("model: SRC\nsteps:\n  - patch: yarn\n    factor: .inf\n")],
    ),
    "recipe 1e400": (
        "finite number",
        lambda w: ["run", w.recipe("model: SRC\nsteps:\n  - patch: yarn\n    factor: 1e400\n"), "-o", w.root / "r"],
    ),
    "recipe set overflow": (
        "finite number",
        lambda w: [
            "run",
            w.recipe("model: SRC\nsteps:\n  - patch: yarn\n    factor: 2\n"),
            "--set",
            "steps.0.factor=1e999",
            "-o",
            w.root / "r",
        ],
    ),
    "recipe set python tag": (
        "not allowed",
        lambda w: [
            "validate",
            w.recipe("model: SRC\nsteps:\n  - patch: yarn\n    factor: 2\n"),
            "--set",
            "steps.0.factor=!!python/object/apply:os.system ['touch /tmp/surgery-code-ran']",
        ],
    ),
    "recipe python tag": (
        "not allowed",
        lambda w: [
            "validate",
            w.recipe("model: !!python/object/apply:os.system ['touch /tmp/surgery-code-ran']\nsteps: []\n"),
        ],
    ),
    "recipe alias loop": (
        "refers to the mapping or list that contains it",
        lambda w: ["validate", w.recipe("model: SRC\nsteps: &s [*s]\n")],
    ),
    "recipe alias loop in a step": (
        "refers to",
        lambda w: ["validate", w.recipe("model: SRC\nsteps:\n  - &m {patch: yarn, factor: 2, x: *m}\n")],
    ),
    "recipe set alias loop": (
        "refers to",
        lambda w: [
            "validate",
            w.recipe("model: SRC\nsteps:\n  - patch: yarn\n    factor: 2\n"),
            "--set",
            "steps.0.factor=&a [*a]",
        ],
    ),
    "recipe set twice": (
        "given 2 times",
        lambda w: [
            "validate",
            w.recipe("model: SRC\nsteps:\n  - patch: yarn\n    factor: 2\n"),
            "--set",
            "steps.0.factor=2",
            "--set",
            "steps.0.factor=3",
        ],
    ),
    "recipe bool for a number": (
        "expected a number, got true",
        lambda w: ["validate", w.recipe("model: SRC\nsteps:\n  - patch: yarn\n    factor: true\n")],
    ),
    "run with a patch the model refuses": (
        "would never slide",
        lambda w: [
            "run",
            w.recipe("model: SRC\nsteps:\n  - patch: sliding-window\n    window: 100000\n"),
            "-o",
            w.root / "r",
        ],
    ),
    "run save target busy": (
        "another surgery process",
        lambda w: [
            "run",
            w.recipe(f"model: SRC\nsteps:\n  - patch: yarn\n    factor: 2\n  - save: {locked(w.root / 'busy')}\n"),
            "-o",
            w.root / "r",
        ],
    ),
    "recipe duplicate key": (
        "duplicate key 'factor'",
        lambda w: ["validate", w.recipe("model: SRC\nsteps:\n  - patch: yarn\n    factor: 2\n    factor: 4\n")],
    ),
    "recipe duplicate top key": (
        "duplicate key 'model'",
        lambda w: ["validate", w.recipe("model: SRC\nmodel: SRC\nsteps:\n  - patch: yarn\n    factor: 2\n")],
    ),
    "recipe empty save": (
        "steps.1.save",
        lambda w: ["validate", w.recipe("model: SRC\nsteps:\n  - patch: yarn\n    factor: 2\n  - save: ''\n")],
    ),
    "recipe not utf-8": ("not UTF-8", lambda w: ["validate", w.file("r.yaml", b"model: \xff\xfe\nsteps: []\n")]),
    "recipe nested deep": (
        "nested more than",
        lambda w: ["validate", w.file("r.yaml", "model: " + "[" * 5000 + "]" * 5000)],
    ),
    "recipe nested deep blocks": (
        "nested more than",
        lambda w: ["validate", w.file("r.yaml", "a:\n" + "".join("  " * i + "- \n" for i in range(1, 3000)))],
    ),
    "recipe alias bomb": ("once aliases are expanded", lambda w: ["validate", w.file("r.yaml", alias_bomb())]),
    "recipe text not txt": (
        "not a .txt or .jsonl",
        lambda w: ["validate", w.recipe("model: SRC\nsteps:\n  - finetune: {method: full, text: /etc/passwd}\n")],
    ),
    "recipe save onto the source": (
        "is the source",
        lambda w: [
            "run",
            w.recipe("model: SRC\nsteps:\n  - patch: yarn\n    factor: 2\n  - save: {path: SRC, force: true}\n"),
            "-o",
            w.root / "r",
        ],
    ),
    "recipe report onto the source": (
        "is the source",
        lambda w: ["run", w.recipe("model: SRC\nsteps:\n  - patch: yarn\n    factor: 2\n"), "-o", w.src, "--force"],
    ),
    "recipe force keeps interrupted run": (
        "not written by surgery",
        lambda w: [
            "run",
            w.recipe(
                f"model: SRC\nsteps:\n  - patch: yarn\n    factor: 2\n  - save: {{path: {foreign_dir(w, 'mine')}, force: true}}\n"
            ),
            "-o",
            interrupted(w, "r"),
            "--force",
        ],
    ),
    "resume with corrupt state": (
        "is corrupt",
        lambda w: [
            "run",
            w.recipe("model: SRC\nsteps:\n  - patch: yarn\n    factor: 2\n"),
            "-o",
            interrupted(w, "r", state="{bad"),
            "--resume",
        ],
    ),
    "run output busy": (
        "another surgery process",
        lambda w: [
            "run",
            w.recipe("model: SRC\nsteps:\n  - patch: yarn\n    factor: 2\n"),
            "-o",
            locked(w.root / "busy"),
        ],
    ),
    # ---- environment
    "push without network": ("push to user/name failed", lambda w: ["push", saved_model(w), "user/name"]),
    "push bad repo id": ("must look like user/name", lambda w: ["push", saved_model(w), "nope"]),
    "push code": ("code or a pickle", lambda w: ["push", saved_model(w, {"evil.py": "import os"}), "user/name"]),
    "push pickles": ("code or a pickle", lambda w: ["push", saved_model(w, {"pytorch_model.bin": "x"}), "user/name"]),
    "push auto_map": (
        "points at custom code",
        lambda w: ["push", saved_model(w, {"generation_config.json": '{"auto_map": {}}'}), "user/name"],
    ),
    "push not a model": ("not a saved model", lambda w: ["push", w.root, "user/name"]),
    "disk full while copying": ("No space left on device", lambda w: [*APPLY, w.src, "-o", w.root / "full"]),
    "disk full while saving": (
        "No space left on device",
        lambda w: [*APPLY, w.src, "-o", w.root / "full", "--load-weights"],
    ),
    # ---- the reliability campaign on the newest surfaces (README "Safety", tests/HOSTILE.md)
    "export tokenizer-pre typo": ("did you mean 'smollm'", lambda w: [*EXPORT(w), "--tokenizer-pre", "smolm"]),
    "export yarn beta zero": (
        "yarn RoPE parameters are out of range",
        lambda w: ["export", "gguf", yarn_config(w, beta_fast=0.0), "-o", w.root / "m.gguf"],
    ),
    "export yarn betas crossed": (
        "must be greater than beta_slow",
        lambda w: ["export", "gguf", yarn_config(w, beta_fast=1.0, beta_slow=32.0), "-o", w.root / "m.gguf"],
    ),
    "export force over a foreign gguf": (
        "surgery did not write",
        lambda w: [*EXPORT(w, foreign_gguf(w.root / "theirs.gguf")), "--force"],
    ),
    "export onto the embedded model": ("holds an embedded model", lambda w: [*EXPORT(w, embedded_file()), "--force"]),
    "export beside the embedded model": (
        "holds an embedded model",
        lambda w: EXPORT(w, embedded_file().with_name("mine.gguf")),
    ),
    "eval text a directory": ("is a directory", lambda w: ["eval", w.src, "--eval", f"perplexity text={w.root}"]),
    "eval text a fifo": ("not a regular file", lambda w: ["eval", w.src, "--eval", f"perplexity text={fifo(w)}"]),
    "eval text /dev/zero": ("not a regular file", lambda w: ["eval", w.src, "--eval", "perplexity text=/dev/zero"]),
    "eval text too big": (
        "more than the",
        lambda w: ["eval", w.src, "--eval", f"perplexity text={w.file('big.txt', 'x' * 5000)}"],
    ),
    "check the same model twice": ("are the same checkpoint", lambda w: ["check", w.src, w.src]),
    "check the same model by another path": (
        "are the same checkpoint",
        lambda w: ["check", w.src, f"{w.root}/./src/"],
    ),
    "check length beyond both contexts": (
        "beyond what either model supports",
        lambda w: ["check", w.src, w.copy(), "--length", "4000000"],
    ),
    "check unknown gate metric": (
        "did you mean 'kl'",
        lambda w: ["check", w.src, w.copy(), "--length", "32", "--gate", "divergence.pydoc.kll@32:max=0.05"],
    ),
    "check other tokenizer": (
        "different tokenizers",
        lambda w: ["check", w.src, other_tokenizer(w), "--length", "32"],
    ),
    "set negative index": (
        "negative ones are not taken",
        lambda w: [
            "validate",
            w.recipe("model: SRC\nsteps:\n  - patch: yarn\n    factor: 2\n"),
            "--set",
            "steps.-1.factor=4",
        ],
    ),
    "recipe push before its save": (
        "move the push after the save",
        lambda w: [
            "validate",
            w.recipe(
                "model: SRC\nsteps:\n  - patch: yarn\n    factor: 2\n  - push: {repo_id: me/x, path: ROOT/out}\n"
                "  - save: ROOT/out\n"
            ),
        ],
    ),
    "mla rank at the cache width": (
        "so the cache would not shrink",
        lambda w: ["apply", "mla", "--kv-rank", "56", "--method", "svd", w.src, "-o", w.root / "o"],
    ),
    "mla rank beyond any model": (
        "less than or equal to 65536",
        lambda w: ["apply", "mla", "--kv-rank", "100000", "--method", "svd", w.src, "-o", w.root / "o"],
    ),
    "mla calibration tokens beyond bound": (
        "less than or equal to 4194304",
        lambda w: ["apply", "mla", "--kv-rank", "16", "--calibration-tokens", "1000000000000", w.src],
    ),
    "push a gguf of only its magic": (
        "not a complete GGUF file",
        lambda w: ["push", saved_model(w), "user/name", "--gguf", w.file("magic.gguf", b"GGUF" + bytes(11))],
    ),
    "push a gguf someone else wrote": (
        "not written by surgery",
        lambda w: ["push", saved_model(w), "user/name", "--gguf", foreign_gguf(w.root / "theirs.gguf")],
    ),
}


def EXPORT(w: World, out: Path | None = None) -> list:  # noqa: N802  (reads like the APPLY prefix)
    return ["export", "gguf", w.src, "-o", out or w.root / "m.gguf"]


def yarn_config(w: World, **rope) -> Path:
    return edit_config(
        w,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, **rope},
        max_position_embeddings=128,
    )


def foreign_gguf(path: Path) -> Path:
    from tests.test_deploy_hostile import foreign_gguf as write

    return write(path)


def embedded_file() -> Path:
    from surgery.models import resolve

    return Path(resolve("smollm2").location)


def fifo(w: World) -> Path:
    path = w.root / "pipe.txt"
    os.mkfifo(path)
    return path


def other_tokenizer(w: World) -> Path:
    from tests.test_deploy_hostile import byte_bpe

    bad = w.copy()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bad / name).unlink(missing_ok=True)
    byte_bpe().save_pretrained(bad)
    return bad


_locks: list[int] = []


def locked(out: Path) -> Path:
    """Hold the lock on `out` as another surgery process would (released after the case)."""
    fd = os.open(out.parent / f".{out.name}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _locks.append(fd)
    return out


def interrupted(w: World, name: str, state: str | None = None) -> Path:
    """A report target with an interrupted run beside it (`NAME.partial`)."""
    partial = w.root / f"{name}.partial"
    partial.mkdir()
    (partial / "state.json").write_text(state or json.dumps({"fingerprint": "0" * 16, "completed": 1}))
    return w.root / name


def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_the_table_is_big_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_one_line_exit_2_and_touches_nothing(name, template, tmp_path, monkeypatch):
    import surgery.data
    import surgery.hub

    message, case = CASES[name]
    world = World(tmp_path, template)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no network, fast
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False) if name == "push without network" else None
    if name == "eval text too big":
        monkeypatch.setattr(surgery.data, "MAX_TEXT_BYTES", 1000)
    if name.startswith("disk full"):
        monkeypatch.setattr(surgery.hub, "clone_file", no_space)
        monkeypatch.setattr(surgery.hub, "write_metadata", no_space)
    for marker in ("/tmp/surgery-code-ran", "/tmp/surgery-pickle-ran"):
        Path(marker).unlink(missing_ok=True)
    args = [str(a) for a in case(world)]
    before = tree(tmp_path)
    try:
        result = CliRunner().invoke(main, args, input="y\ny\ny\n", catch_exceptions=False)
    finally:
        while _locks:
            os.close(_locks.pop())
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output
    after = tree(tmp_path)
    assert after == before, {
        k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)
    }
    assert not Path("/tmp/surgery-code-ran").exists() and not Path("/tmp/surgery-pickle-ran").exists()
