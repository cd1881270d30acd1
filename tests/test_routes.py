"""Patches applied to a checkpoint on disk by the cheapest route (surgery.apply_to_checkpoint):
the plan, equality with the in-memory patches, the memory a stream costs, and refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import surgery
from surgery.cli import main
from surgery.patch import make_patch
from surgery.routes import plan_routes
from tests.conftest import char_tokenizer, tiny_config, tiny_model


def tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def multi_shard(path, **overrides):
    tiny_model("llama", **overrides).save_pretrained(path, max_shard_size="20KB")
    char_tokenizer().save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 3  # really sharded
    return path


def test_gqa_then_yarn_streams_then_edits_the_config_and_equals_the_in_memory_patches(tmp_path):
    src = multi_shard(tmp_path / "src")
    patches = [make_patch("gqa", num_kv_heads=1), make_patch("yarn", factor=4)]
    lines = []
    done = surgery.apply_to_checkpoint(src, patches, tmp_path / "disk", say=lines.append)
    assert [s.route for s in done.plan.steps] == ["stream", "config"] and len(lines) == 2
    model, tok = surgery.load_model(str(src))
    for p in [make_patch("gqa", num_kv_heads=1), make_patch("yarn", factor=4)]:
        surgery.apply(model, p, tokenizer=tok)
    surgery.save(model, tok, tmp_path / "memory")
    disk, memory = tensors(tmp_path / "disk"), tensors(tmp_path / "memory")
    assert disk.keys() == memory.keys() and all(torch.equal(disk[k], memory[k]) for k in disk)
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("disk", "memory")]
    for c in configs:
        c.pop("transformers_version", None)
    assert configs[0] == configs[1] and [r["name"] for r in configs[0]["surgery"]] == ["gqa", "yarn"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no stage left behind


def test_the_plan_takes_the_cheapest_route_patch_by_patch():
    cfg = tiny_config("llama")
    yarn, mean = make_patch("yarn", factor=2), make_patch("gqa", num_kv_heads=1)
    aligned = make_patch("gqa", num_kv_heads=1, method="aligned")
    assert [s.route for s in plan_routes(cfg, [yarn, mean]).steps] == ["config", "stream"]
    plan = plan_routes(cfg, [yarn, aligned, make_patch("ntk", factor=2)])
    assert [s.route for s in plan.steps] == ["config", "memory", "memory"]
    assert "cannot stream" in plan.steps[1].why and "loaded by then" in plan.steps[2].why
    assert [s.route for s in plan_routes(cfg, [yarn], dtype="bfloat16").steps] == ["memory"]
    assert [s.route for s in plan_routes(cfg, [yarn], on_disk=False).steps] == ["memory"]
    assert [s.route for s in plan_routes(cfg, [yarn, mean], "memory").steps] == ["memory", "memory"]
    with pytest.raises(surgery.SurgeryError, match="route config cannot apply gqa: gqa rewrites weights"):
        plan_routes(cfg, [yarn, mean], "config")
    with pytest.raises(surgery.SurgeryError, match="route stream cannot apply gqa: gqa cannot stream"):
        plan_routes(cfg, [aligned], "stream")
    with pytest.raises(surgery.SurgeryError, match="unknown route 'disk'"):
        plan_routes(cfg, [yarn], "disk")
    with pytest.raises(surgery.SurgeryError, match="4 kv heads"):  # the second patch sees the first's config
        plan_routes(cfg, [mean, make_patch("gqa", num_kv_heads=4)])


def test_a_failing_step_leaves_no_output_and_no_stage(tmp_path, monkeypatch):
    import surgery.hub

    src = multi_shard(tmp_path / "src")

    def broken(*args, **kwargs):
        raise surgery.SurgeryError("disk full")

    monkeypatch.setattr(surgery.hub, "apply_config_only", broken)
    with pytest.raises(surgery.SurgeryError, match="disk full"):
        surgery.apply_to_checkpoint(src, ["mqa", make_patch("yarn", factor=2)], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_patch_and_save_recipe_holds_a_tensor_not_the_model(tmp_path):
    """gqa (mean) + yarn + save on a 6-shard checkpoint of ~200 MB, run as a recipe in a fresh
    process: the patches take the stream then config routes, the save clones their checkpoint
    without loading it, and the peak memory added to the interpreter (torch and transformers
    imported, the skeleton built) is a small fraction of the checkpoint. The output equals the
    same patches applied in memory, tensor for tensor."""
    import yaml

    src = tmp_path / "src"
    cfg = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=24, num_attention_heads=8)
    cfg |= dict(num_key_value_heads=8, vocab_size=512, head_dim=64, max_position_embeddings=2048)
    tiny_model("llama", **cfg).to(torch.float16).save_pretrained(src, max_shard_size="40MB")
    char_tokenizer().save_pretrained(src)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert size > 150e6 and len(list(src.glob("*.safetensors"))) > 4
    steps = [{"patch": "gqa", "num_kv_heads": 2}, {"patch": "yarn", "factor": 4}, {"save": str(tmp_path / "out")}]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"model": str(src), "dtype": "auto", "steps": steps}))
    script = textwrap.dedent(f"""
        import surgery
        from surgery.models import load_config, skeleton
        from surgery.recipes import load_recipe, run_recipe
        skeleton(load_config({str(src)!r}))
        def rss(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        base = rss("VmRSS:")
        run_recipe(load_recipe({str(tmp_path / "r.yaml")!r}), {str(tmp_path / "run")!r})
        print(rss("VmHWM:") - base)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    *lines, added = result.stdout.strip().splitlines()
    text = "\n".join(lines)
    assert "on disk, stream route" in text and "on disk, config route" in text and "not loading" in text, text
    assert int(added) < 0.2 * size, (int(added) / 1e6, size / 1e6)
    model, tok = surgery.load_model(str(src))
    for p in [make_patch("gqa", num_kv_heads=2), make_patch("yarn", factor=4)]:
        surgery.apply(model, p, tokenizer=tok)
    saved, expected = tensors(tmp_path / "out"), model.state_dict()
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    reloaded, _ = surgery.load_model(str(tmp_path / "out"))
    assert [r["name"] for r in surgery.patch.history(reloaded.config)] == ["gqa", "yarn"]
    assert (tmp_path / "out" / "recipe.yaml").is_file() and "gqa" in (tmp_path / "out" / "README.md").read_text()


def test_a_recipe_runs_its_leading_patches_on_disk_before_loading(tmp_path):
    """gqa (mean) then yarn at the head of a recipe: streamed and config-edited on disk, printed
    with their routes, then loaded for the eval; the saved model equals the in-memory patches."""
    import yaml

    from surgery.recipes import load_recipe, run_recipe

    src = multi_shard(tmp_path / "src")
    steps = [
        {"patch": "gqa", "num_kv_heads": 1},
        {"patch": "yarn", "factor": 4},
        {"eval": "perplexity", "lengths": [64], "samples": 1},
        {"save": str(tmp_path / "saved")},
    ]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"model": str(src), "dtype": "auto", "steps": steps}))
    shown = CliRunner().invoke(main, ["validate", str(tmp_path / "r.yaml"), "--model", str(src)]).output
    assert "before loading, on disk: gqa: stream" in shown and "on disk: yarn: config" in shown, shown
    lines = []
    outcome = run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "run", echo=lines.append)
    text = "\n".join(lines)
    assert outcome.passed and "[1/4] patch gqa → 1 kv head (mean): on disk, stream route" in text, text
    assert "[2/4] patch yarn ×4: on disk, config route" in text and "after the steps on disk" in text
    model, tok = surgery.load_model(str(src))
    for p in [make_patch("gqa", num_kv_heads=1), make_patch("yarn", factor=4)]:
        surgery.apply(model, p, tokenizer=tok)
    saved = tensors(tmp_path / "saved")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items() if k in saved) and len(saved) > 10
    assert outcome.state.labels["2"] == "after gqa → 1 kv head (mean), yarn ×4"
