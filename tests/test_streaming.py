"""Streaming conversion equals the in-memory path tensor for tensor, and refuses what it cannot do."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from surgery.cli import main
from surgery.streaming import read_header, stream_file
from tests.conftest import char_tokenizer, logits, tiny_model, tokens


def tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma3"])
def test_streaming_equals_in_memory_tensor_for_tensor(arch, tmp_path):
    src = tmp_path / "src"
    tiny_model(arch, num_key_value_heads=4).save_pretrained(src, max_shard_size="40KB")  # several shards
    assert len(list(src.glob("*.safetensors"))) > 2
    runner = CliRunner()
    for mode in ("--streaming", "--no-streaming"):
        result = runner.invoke(
            main, ["apply", "gqa", "--num-kv-heads", "2", str(src), "-o", str(tmp_path / mode), mode]
        )
        assert result.exit_code == 0, result.output
    streamed, loaded = tensors(tmp_path / "--streaming"), tensors(tmp_path / "--no-streaming")
    assert streamed.keys() == loaded.keys()
    for name in streamed:
        assert streamed[name].dtype == loaded[name].dtype and torch.equal(streamed[name], loaded[name]), name
    a = json.loads((tmp_path / "--streaming" / "config.json").read_text())
    b = json.loads((tmp_path / "--no-streaming" / "config.json").read_text())
    assert a == b and a["num_key_value_heads"] == 2
    index = json.loads((tmp_path / "--streaming" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in streamed.values())
    ids = tokens(30)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "--streaming").eval()
    assert torch.equal(
        logits(stock, ids), logits(AutoModelForCausalLM.from_pretrained(tmp_path / "--no-streaming"), ids)
    )


def test_stream_file_preserves_bf16_and_metadata(tmp_path):
    data = {
        "a": torch.randn(4, 3).to(torch.bfloat16),
        "b.self_attn.k_proj.weight": torch.randn(8, 2),
        "c": torch.arange(5),
    }
    save_file(data, tmp_path / "in.safetensors", metadata={"format": "pt"})
    stream_file(tmp_path / "in.safetensors", tmp_path / "out.safetensors", lambda name, t: t * 2 if name == "a" else t)
    out = load_file(tmp_path / "out.safetensors")
    assert torch.equal(out["a"], data["a"] * 2) and torch.equal(out["c"], data["c"])
    assert read_header(tmp_path / "out.safetensors")[0]["__metadata__"] == {"format": "pt"}


def test_aligned_cannot_stream(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    result = CliRunner().invoke(
        main,
        [
            "apply",
            "gqa",
            "--num-kv-heads",
            "1",
            "--method",
            "aligned",
            str(src),
            "-o",
            str(tmp_path / "o"),
            "--streaming",
        ],
    )
    assert result.exit_code == 2 and "runs in memory only; drop --streaming" in result.stderr
    assert not (tmp_path / "o").exists()


def test_a_streamable_patch_streams_and_a_data_aware_one_warns_when_the_model_would_not_fit(tmp_path, monkeypatch):
    import surgery.streaming

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    result = CliRunner().invoke(main, ["apply", "mqa", str(src), "-o", str(tmp_path / "o")])
    assert result.exit_code == 0 and "streamed tensor by tensor" in result.output, result.output
    monkeypatch.setattr(surgery.streaming, "available_memory", lambda: 1000)  # bytes
    args = ["apply", "mqa", "--method", "aligned", str(src), "-o", str(tmp_path / "a")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "weights loaded: mqa cannot stream" in result.output, result.output
    assert "may not fit in memory" in result.stderr


def test_a_cloned_file_never_shares_what_a_write_could_change(tmp_path, monkeypatch):
    """The config-only route's copy: a reflink where the file system has them, else a kernel or a
    buffered copy (across file systems: a tmpfs target, or copy_file_range refusing midway). A
    write into the output afterwards leaves the source bit-identical."""
    import errno
    import hashlib
    import os

    from surgery.io import clone_file

    src = tmp_path / "model.safetensors"
    src.write_bytes(os.urandom(3 << 20) + b"tail")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    targets = [tmp_path / "same-fs.safetensors"]
    if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
        targets.append(Path(tempfile.mkdtemp(dir="/dev/shm")) / "tmpfs.safetensors")
    for dst in targets:
        how = clone_file(src, dst)
        assert how in ("reflink", "kernel copy", "copy") and dst.read_bytes() == src.read_bytes(), how
        with open(dst, "r+b") as f:  # an in-place write, as an editing tool would make
            f.seek(1 << 20)
            f.write(b"\0" * 4096)
        assert hashlib.sha256(src.read_bytes()).hexdigest() == digest and os.stat(src).st_nlink == 1
        if dst.parent != tmp_path:
            shutil.rmtree(dst.parent)
    calls = []

    def refuses_midway(fd_in, fd_out, count, offset_src=None):  # a first chunk, then EXDEV
        if calls:
            raise OSError(errno.EXDEV, "cross-device")
        calls.append(count)
        return real(fd_in, fd_out, 1 << 20, offset_src)

    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", refuses_midway)
    monkeypatch.setattr("surgery.io.fcntl.ioctl", lambda *a: (_ for _ in ()).throw(OSError(errno.EOPNOTSUPP, "")))
    dst = tmp_path / "fallback.safetensors"
    assert clone_file(src, dst) == "copy" and dst.read_bytes() == src.read_bytes()


def test_streaming_shows_progress_on_a_terminal_and_none_under_quiet(tmp_path, monkeypatch):
    import io

    import surgery.io
    from surgery.patch import make_patch
    from surgery.streaming import apply_streaming

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    for quiet in (False, True):
        monkeypatch.setattr(sys, "stderr", Terminal())
        monkeypatch.setattr(surgery.io, "QUIET", quiet)
        apply_streaming(make_patch("mqa"), src, tmp_path / f"out-{quiet}")
        shown = sys.stderr.getvalue()
        assert ("streaming tensors" in shown) != quiet and "copying" not in shown, shown  # no bar for small files


def test_long_work_logs_progress_lines_where_no_bar_can_show(tmp_path, monkeypatch, caplog):
    """Under nohup or CI (stderr is a file) a bar cannot show: long work logs a line a minute with
    count, rate and time left; work shorter than that logs nothing; --quiet logs nothing."""
    import io
    import logging

    import surgery.io
    from surgery.patch import make_patch
    from surgery.streaming import apply_streaming

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger="surgery")
    apply_streaming(make_patch("mqa"), src, tmp_path / "short")
    assert not [r for r in caplog.records if r.name == "surgery.io"]  # a second of work: no line

    monkeypatch.setattr(surgery.io, "LOG_EVERY", 0.0)  # every update is "a minute later"
    caplog.clear()
    apply_streaming(make_patch("mqa"), src, tmp_path / "logged")
    lines = [r.getMessage() for r in caplog.records if r.name == "surgery.io"]
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    total = surgery.io.LoggedProgress(size, "", "B", unit_scale=True, unit_divisor=1024).size(size)
    assert lines and lines[-1].startswith("streaming tensors: ") and f"/{total}, " in lines[-1], lines

    bar = surgery.io.progress(10, "finetune", "step")
    for loss in (2.5, 1.25):
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.update(5)
    first, last = (r.getMessage() for r in caplog.records[-2:])
    assert first.startswith("finetune: 5/10 step, ") and first.endswith(" left (loss 2.500)"), first
    assert last.startswith("finetune: 10/10 step, ") and last.endswith(" 00:00 left (loss 1.250)"), last

    import tqdm.autonotebook

    with monkeypatch.context() as patched:  # in Jupyter tqdm's widget shows instead
        patched.setattr(tqdm.autonotebook, "tqdm", type("NotebookBar", (), {}))
        assert not isinstance(surgery.io.progress(3, "finetune"), surgery.io.LoggedProgress)
    assert isinstance(surgery.io.progress(3, "finetune"), surgery.io.LoggedProgress)

    monkeypatch.setattr(surgery.io, "QUIET", True)
    caplog.clear()
    apply_streaming(make_patch("mqa"), src, tmp_path / "quiet")
    assert not [r for r in caplog.records if r.name == "surgery.io"]
