"""Faults: a kill at every write boundary of a recipe run, then `--resume`, gives bit-identical
results; killed writers leave nothing that blocks or pollutes the next run; SIGTERM cleans up;
two concurrent writers never both succeed; code shipped with a checkpoint never runs, whatever
stdin says. Kills need real processes: each killed run is a subprocess (SIGKILL through
`SURGERY_FAULT`, see `surgery.io.fault_point`); resumes run in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import surgery
from surgery.cli import main
from tests.conftest import char_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from surgery.cli import main; main()"]


def cli(*args, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [*CLI, *map(str, args)], env=environ, input=stdin, capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    surgery.save(tiny_model("llama"), char_tokenizer(), root / "tiny")
    steps = [{"patch": "gqa", "num_kv_heads": 1}, {"patch": "yarn", "factor": 2}, {"save": "SAVED"}]
    (root / "recipe.yaml").write_text(
        json.dumps({"model": str(root / "tiny"), "dtype": "float32", "steps": steps}).replace(
            '"SAVED"', json.dumps(str(root / "saved"))
        )
    )
    trace = root / "trace.txt"
    clean = cli("run", root / "recipe.yaml", "-o", root / "clean-run", env={"SURGERY_FAULT_TRACE": str(trace)})
    assert clean.returncode == 0, clean.stderr
    (root / "saved").rename(root / "reference")
    return root, trace.read_text().split()


def weights_and_config(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    config = json.loads((directory / "config.json").read_text())
    keep = ("num_key_value_heads", "max_position_embeddings", "rope_parameters")
    return load_file(directory / "model.safetensors"), {k: config[k] for k in keep} | {
        "patches": [r["name"] for r in config["surgery"]]
    }


def test_the_trace_covers_every_write_boundary(world):
    _, points = world
    names = {p.rsplit(":", 1)[0] for p in points}
    # the two patches run on disk (a streamed stage, then the checkpoint), the save and the report
    # are renamed into place; the state is written at the start, after the steps on disk, after the save
    assert names == {"run-started", "state-written", "before-rename", "after-rename"}
    assert points.count("state-written:3") == 1 and "before-rename:4" in points and len(points) == 12


def test_a_kill_at_every_write_boundary_then_resume_gives_the_same_model(world, tmp_path):
    root, points = world
    ref_weights, ref_config = weights_and_config(root / "reference")
    assert ref_config["patches"] == ["gqa", "yarn"] and ref_config["max_position_embeddings"] == 128
    recipe = (root / "recipe.yaml").read_text().replace(str(root / "saved"), str(tmp_path / "saved"))
    (tmp_path / "recipe.yaml").write_text(recipe)
    matrix = {}
    for point in points:
        out, saved = tmp_path / "run", tmp_path / "saved"
        killed = cli("run", tmp_path / "recipe.yaml", "-o", out, env={"SURGERY_FAULT": point})
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr)
        resumed = CliRunner().invoke(main, ["run", str(tmp_path / "recipe.yaml"), "-o", str(out), "--resume"])
        assert resumed.exit_code == 0, (point, resumed.output)
        weights, config = weights_and_config(saved)
        assert config == ref_config, point  # never a patch applied twice (yarn x4, 3 records)
        assert weights.keys() == ref_weights.keys() and all(torch.equal(weights[k], ref_weights[k]) for k in weights)
        assert not out.with_name("run.partial").exists() and hidden(tmp_path) == [], (point, hidden(tmp_path))
        matrix[point] = "identical"
        for done in (out, saved):
            surgery.io.check_target(done, True)  # ours: safe to clear for the next point
            os.system(f"rm -rf '{done}'")
    assert len(matrix) == len(points) >= 10


def test_a_killed_apply_leaves_debris_the_next_writer_removes(world, tmp_path):
    root, _ = world
    out = tmp_path / "out"
    args = ("apply", "yarn", "--factor", "2", root / "tiny", "-o", out, "--load-weights")
    killed = cli(*args, env={"SURGERY_FAULT": "before-rename"})
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists() and [n.split("-")[0] for n in hidden(tmp_path)] == [".out.lock", ".out.tmp"]
    again = CliRunner().invoke(main, list(map(str, args)))
    assert again.exit_code == 0, again.output
    assert hidden(tmp_path) == [] and json.loads((out / "config.json").read_text())["max_position_embeddings"] == 128


def test_a_writer_killed_after_its_rename_leaves_no_lock_behind(world, tmp_path):
    root, _ = world
    out = tmp_path / "out"
    args = ("apply", "yarn", "--factor", "2", root / "tiny", "-o", out)
    assert cli(*args, env={"SURGERY_FAULT": "after-rename"}).returncode == -signal.SIGKILL
    assert (out / "surgery.json").is_file() and hidden(tmp_path) == [".out.lock"]
    again = CliRunner().invoke(main, list(map(str, args)))
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert hidden(tmp_path) == []  # the refusal cleared the dead writer's lock


def test_sigterm_during_a_write_removes_the_temporary_directory(tmp_path, monkeypatch):
    from surgery.io import atomic_dir, terminate_cleanly

    monkeypatch.setattr(signal, "getsignal", lambda _sig: signal.SIG_DFL)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        terminate_cleanly()
        with pytest.raises(SystemExit) as exit_info, atomic_dir(tmp_path / "out") as tmp:
            (tmp / "weights").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("route", ["config", "loaded"])
def test_outputs_follow_the_umask(world, tmp_path, route):
    from surgery import io

    root, _ = world
    old = os.umask(0o027)
    args = ["apply", "yarn", "--factor", "2", str(root / "tiny"), "-o", str(tmp_path / "o")]
    try:
        io.UMASK = 0o027
        result = CliRunner().invoke(main, args + (["--load-weights"] if route == "loaded" else []))
    finally:
        os.umask(old)
        io.UMASK = old
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o750
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "o").iterdir()}
    assert set(modes.values()) == {0o640}, modes  # the weights too, whatever the library wrote them with


@pytest.mark.parametrize("route", ["config", "loaded", "streamed"])
def test_two_concurrent_writers_one_wins_the_other_gets_one_line(world, tmp_path, route):
    root, _ = world
    patch = ["gqa", "--num-kv-heads", "1", "--streaming"] if route == "streamed" else ["yarn", "--factor", "2"]
    extra = ["--load-weights"] if route == "loaded" else []
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    args = [*CLI, "apply", *patch, str(root / "tiny"), "-o", str(tmp_path / "out"), *extra]
    # the first writer is held inside its write (SIGSTOP at the rename) while the second starts
    first = subprocess.Popen(
        args, env={**environ, "SURGERY_FAULT_STOP": "before-rename"}, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until_stopped(first.pid)
        second = subprocess.run(args, env=environ, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1 and "another surgery process is writing" in lines[0], lines
    assert hidden(tmp_path) == [] and (tmp_path / "out" / "surgery.json").is_file()


def wait_until_stopped(pid: int) -> None:
    import time

    for _ in range(1200):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.05)
    raise AssertionError("the first writer never reached its write")


EVIL = "open({marker!r}, 'w').write('code ran')\n"


def evil_checkpoint(root: Path, marker: Path) -> Path:
    """A Llama checkpoint whose config and tokenizer config point at code that writes `marker`."""
    path = root / "evil"
    surgery.save(tiny_model("llama"), char_tokenizer(), path)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}
    (path / "config.json").write_text(json.dumps(config))
    config["architectures"] = ["EvilForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        data = json.loads((path / name).read_text()) if (path / name).is_file() else {}
        data["auto_map"] = {"AutoTokenizer": ["tokenization_evil.Evil", "tokenization_evil.Evil"]}
        (path / name).write_text(json.dumps(data))
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (path / name).write_text(EVIL.format(marker=str(marker)))
    return path


def test_code_in_a_checkpoint_never_runs_even_when_stdin_says_yes(tmp_path):
    """A Llama checkpoint with auto_map: loaded with transformers' own classes, never its code; no
    output carries the code or the auto_map. (A checkpoint that only code could load is refused:
    see the hostile-input table.)"""
    marker = tmp_path / "marker"
    evil = evil_checkpoint(tmp_path, marker)
    (tmp_path / "r.yaml").write_text(
        json.dumps({"model": str(evil), "steps": [{"patch": "yarn", "factor": 2}, {"save": str(tmp_path / "r-saved")}]})
    )
    commands = {
        "apply": ["apply", "yarn", "--factor", "2", evil, "-o", tmp_path / "a"],
        "apply-loaded": ["apply", "yarn", "--factor", "2", evil, "-o", tmp_path / "b", "--load-weights"],
        "streamed": ["apply", "gqa", "--num-kv-heads", "1", evil, "-o", tmp_path / "c", "--streaming"],
        "inspect": ["inspect", evil],
        "eval": ["eval", evil, "--eval", "perplexity lengths=16", "-o", tmp_path / "e"],
        "run": ["run", tmp_path / "r.yaml", "-o", tmp_path / "r"],
    }
    for name, args in commands.items():
        result = CliRunner().invoke(main, list(map(str, args)), input="y\n" * 20)
        assert result.exit_code == 0, (name, result.output)
        assert not marker.exists(), name
    assert cli("inspect", evil, stdin="y\n" * 20).returncode == 0 and not marker.exists()  # a real stdin
    for out in ("a", "b", "c", "r-saved"):
        files = sorted((tmp_path / out).iterdir())
        assert not any(f.suffix == ".py" for f in files), (out, files)
        for f in files:
            assert f.suffix != ".json" or "auto_map" not in json.loads(f.read_text()), (out, f.name)
        assert json.loads((tmp_path / out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
