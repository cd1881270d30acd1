"""Recipes: every shipped file validates and round-trips; malformed files fail with a clear message
and write nothing; a recipe runs end to end on a tiny model (patch, finetune, evals, gates, save,
push); a killed run resumes to the same result; fine-tuning runs under accelerate with 2 processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import surgery
from surgery.cli import main
from surgery.errors import RecipeError
from surgery.evaluate import make_eval
from surgery.recipes import load_recipe, validate_data
from surgery.recipes import runner as runner_module
from surgery.recipes.report import labelled
from tests.conftest import char_tokenizer, tiny_model

ROOT = Path(__file__).parent.parent
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
BAD = sorted((Path(__file__).parent / "fixtures" / "bad_recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate_and_round_trip(path):
    recipe = load_recipe(path)
    again = validate_data(yaml.safe_load(recipe.to_yaml()), "round trip")
    assert again.model_dump() == recipe.model_dump()
    assert [s.label for s in again.compiled] == [s.label for s in recipe.compiled]


def test_every_bad_recipe_states_what_it_expects():
    """Each malformed fixture names the message it must produce, and the messages differ: 25+
    distinct mistakes, not one mistake 25 times."""
    expected = [p.read_text().splitlines()[0].removeprefix("# expect: ") for p in BAD]
    assert all(not e.startswith("#") and e for e in expected)
    assert len(set(expected)) == len(BAD) >= 25


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_recipe_fails_clearly_and_writes_nothing(path, tmp_path):
    expect = path.read_text().splitlines()[0].removeprefix("# expect: ")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert expect in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: ")
    assert not out.exists() and not out.with_name("run.partial").exists()
    check = CliRunner().invoke(main, ["validate", str(path)])
    assert check.exit_code == 2 and expect in check.stderr


def test_every_problem_is_reported_at_once():
    with pytest.raises(RecipeError) as info:
        load_recipe(Path(__file__).parent / "fixtures" / "bad_recipes" / "31-many-problems.yaml")
    text = "\n".join(info.value.problems)
    for part in ("modell: unknown key", "steps.0.factor", "steps.1.lenghts: unknown key; did you mean 'lengths'"):
        assert part in text
    assert "steps.3.push: nothing saved yet" in text


def test_set_overrides_before_validation(tmp_path):
    path = ROOT / "recipes" / "smollm2-yarn.yaml"
    recipe = load_recipe(path, ["steps.2.factor=4", "seed=7"])
    assert recipe.compiled[2].payload.factor == 4 and recipe.seed == 7
    with pytest.raises(RecipeError, match="no 'steps.9.factor'"):
        load_recipe(path, ["steps.9.factor=4"])
    with pytest.raises(RecipeError, match="steps.2.factor: Input should be a valid number"):
        load_recipe(path, ["steps.2.factor=big"])


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    out = tmp_path / "tiny"
    surgery.save(tiny_model("llama", num_hidden_layers=2), char_tokenizer(), out)
    return out


def write_recipe(tmp_path: Path, model: Path, steps: list[dict], name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"model": str(model), "dtype": "float32", "seed": 3, "steps": steps}))
    return path


PPL = {"eval": "perplexity", "lengths": [64], "samples": 2}
HEAL = {"finetune": {"method": "full", "trainable": ["*.self_attn.*"], "max_steps": 4, "seq_len": 32, "batch_size": 2}}


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: the real push code calls it; uploads land in a folder."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def create_commit(self, *, repo_id, operations, revision=None, create_pr=False, **kwargs):
        self.calls.append(("create_commit", repo_id, {"revision": revision, "create_pr": create_pr, **kwargs}))
        branch = f"pr-{len(self.calls)}" if create_pr else revision or "main"
        for op in operations:
            target = self.root / repo_id / branch / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, target)
        url = f"https://huggingface.co/{repo_id}/discussions/{len(self.calls)}" if create_pr else None
        return types.SimpleNamespace(pr_url=url)


def test_recipe_runs_end_to_end(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    steps = [
        PPL,
        {"patch": "gqa", "num_kv_heads": 1},
        PPL,
        HEAL,
        PPL,
        {"gate": ["perplexity.ppl@64:max=1000", "perplexity.ppl@64:max_increase=50%"]},
        {"save": "saved"},
        {"push": {"repo_id": "someone/tiny-mqa", "private": True, "revision": "heal"}},
    ]
    recipe = load_recipe(write_recipe(tmp_path, tiny_dir, steps))
    api = RecordingApi(tmp_path / "hub")
    lines: list[str] = []
    outcome = surgery.recipes.run_recipe(recipe, tmp_path / "run", echo=lines.append, api=api)
    assert outcome.passed
    state = outcome.state
    first, last = state.metrics(first=True)["perplexity.ppl@64"], state.metrics(first=False)["perplexity.ppl@64"]
    assert [r.metrics["perplexity.ppl@64"] for r in state.results][0] == first and first != last
    assert state.finetunes[0]["losses"][-1] < state.finetunes[0]["losses"][0]
    assert any(line.startswith("[4/8] finetune full 4 steps") for line in lines)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "perplexity.ppl@64" in report and (tmp_path / "run" / "loss.png").is_file()
    assert not (tmp_path / "run.partial").exists()
    # plots name what each curve shows, not a step number
    assert list(state.labels.values()) == [
        "before",
        "after gqa → 1 kv head (mean)",
        "after gqa → 1 kv head (mean), full heal",
    ]
    assert list(labelled(recipe, state)) == list(state.labels.values())

    saved = tmp_path / "saved"
    assert yaml.safe_load((saved / "recipe.yaml").read_text())["steps"][1] == {"patch": "gqa", "num_kv_heads": 1}
    card = (saved / "README.md").read_text()
    assert "## Recipe" in card and "## Before / after" in card and "perplexity.ppl@64" in card
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the Hub's own parser reads the header without a complaint
        header = ModelCard(card).data
    assert header.tags == ["surgery", "gqa"] and header.library_name == "transformers"
    assert header.base_model is None  # a local directory is no Hub id
    results = {r.metric_name: r.metric_value for r in header.eval_results}
    assert results["perplexity.ppl@64 (before)"] == first
    assert results["perplexity.ppl@64 (after gqa → 1 kv head (mean), full heal)"] == last
    assert {r.dataset_type for r in header.eval_results} == {"surgery/perplexity"}
    stock = AutoModelForCausalLM.from_pretrained(saved)
    assert stock.config.num_key_value_heads == 1
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[0][2]["private"] is True and api.calls[2][2]["revision"] == "heal"
    assert (tmp_path / "hub" / "someone" / "tiny-mqa" / "heal" / "model.safetensors").is_file()


def test_failed_gate_exits_1_and_saves_nothing(tiny_dir, tmp_path):
    steps = [
        PPL,
        {"patch": "gqa", "num_kv_heads": 1},
        PPL,
        {"gate": "perplexity.ppl@64:max_increase=0"},
        {"save": str(tmp_path / "saved")},
    ]
    path = write_recipe(tmp_path, tiny_dir, steps)
    result = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1, result.output
    assert "FAIL  perplexity.ppl@64" in result.output and "skipped (a gate failed)" in result.output
    assert not (tmp_path / "saved").exists()
    assert "A gate failed" in (tmp_path / "run" / "report.md").read_text()


def test_plots_group_results_by_stage_and_name_them():
    from surgery.evaluate.base import EvalResult
    from surgery.recipes.state import RunState

    def result(name: str, step: int) -> EvalResult:
        return EvalResult(name=name, params={}, metrics={}, details={"step": step})

    state = RunState(fingerprint="f", labels={"0": "before", "1": "before", "3": "after yarn ×2", "4": "after yarn ×2"})
    state.results = [result("perplexity", 0), result("needle", 1), result("perplexity", 3), result("needle", 4)]
    state.results.append(result("perplexity", 5))
    state.labels["5"] = "after yarn ×2"
    groups = labelled(validate_data({"model": "m", "steps": [{"eval": "perplexity"}]}, "r"), state)
    assert {k: [(r.name, r.details["step"]) for r in v.results] for k, v in groups.items()} == {
        "before": [("perplexity", 0), ("needle", 1)],
        "after yarn ×2": [("perplexity", 3), ("needle", 4)],
        "after yarn ×2 (step 6)": [("perplexity", 5)],
    }


def test_killed_run_resumes_to_the_same_result(tiny_dir, tmp_path, monkeypatch):
    steps = [PPL, {"patch": "gqa", "num_kv_heads": 1}, HEAL, PPL, {"save": str(tmp_path / "full-save")}]
    recipe = load_recipe(write_recipe(tmp_path, tiny_dir, steps))
    straight = surgery.recipes.run_recipe(recipe, tmp_path / "straight", echo=lambda _: None)

    steps[-1] = {"save": str(tmp_path / "resumed-save")}
    recipe = load_recipe(write_recipe(tmp_path, tiny_dir, steps, "again.yaml"))
    real = runner_module.run_step

    def killed(step, *args, **kwargs):
        if step.index == 3:
            raise KeyboardInterrupt
        return real(step, *args, **kwargs)

    monkeypatch.setattr(runner_module, "run_step", killed)
    with pytest.raises(KeyboardInterrupt):
        surgery.recipes.run_recipe(recipe, tmp_path / "run", echo=lambda _: None)
    partial = tmp_path / "run.partial"
    assert not (tmp_path / "run").exists() and not (tmp_path / "resumed-save").exists()
    assert json.loads((partial / "state.json").read_text())["completed"] == 3
    state = json.loads((partial / "state.json").read_text())
    assert state["checkpoint"] == "checkpoint-3" and (partial / "checkpoint-3" / "model.safetensors").is_file()
    assert not (partial / "checkpoint-2").exists()  # replaced once the state pointed past it
    with pytest.raises(surgery.SurgeryError, match="--resume"):
        surgery.recipes.run_recipe(recipe, tmp_path / "run", echo=lambda _: None)

    monkeypatch.setattr(runner_module, "run_step", real)
    lines: list[str] = []
    resumed = surgery.recipes.run_recipe(recipe, tmp_path / "run", resume=True, echo=lines.append)
    assert "resuming after step 3" in lines[0]
    assert [r.metrics for r in resumed.state.results] == [r.metrics for r in straight.state.results]
    a, b = (
        load_file(tmp_path / "full-save" / "model.safetensors"),
        load_file(tmp_path / "resumed-save" / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validate_dry_runs_patches_on_the_model_config(tiny_dir, tmp_path):
    ok = write_recipe(
        tmp_path, tiny_dir, [{"patch": "gqa", "num_kv_heads": 1, "method": "aligned"}, {"patch": "yarn", "factor": 2}]
    )
    result = CliRunner().invoke(main, ["validate", str(ok), "--model", str(tiny_dir)])
    assert result.exit_code == 0, result.output
    assert "dry run steps.0 gqa-numkvheads1-methodaligned" in result.output and "steps.1 yarn-factor2" in result.output
    bad = write_recipe(tmp_path, tiny_dir, [{"patch": "gqa", "num_kv_heads": 3}], "bad.yaml")
    result = CliRunner().invoke(main, ["validate", str(bad), "--model", str(tiny_dir)])
    assert result.exit_code == 2 and "steps.0.patch (gqa)" in result.stderr


def test_push_cli_never_shows_the_token(tiny_dir, tmp_path, monkeypatch):
    import huggingface_hub

    secret = "hf_" + "x" * 30
    monkeypatch.setenv("HF_TOKEN", secret)
    api = RecordingApi(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    result = CliRunner().invoke(main, ["push", str(tiny_dir), "me/tiny", "--private"])
    assert result.exit_code == 0, result.output
    assert "https://huggingface.co/me/tiny" in result.output and secret not in result.output
    uploaded = tmp_path / "hub" / "me" / "tiny" / "main"
    assert all(secret not in f.read_text(errors="ignore") for f in uploaded.iterdir() if f.suffix in (".json", ".md"))
    bad = CliRunner().invoke(main, ["push", str(tmp_path), "me/tiny"])
    assert bad.exit_code == 2 and "is not a saved model" in bad.stderr


def test_push_opens_a_pull_request_holding_the_gguf_too(tmp_path, monkeypatch):
    import huggingface_hub

    from surgery.export import export_gguf
    from tests.test_deploy_hostile import byte_bpe

    api = RecordingApi(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    tiny_dir = tmp_path / "tiny"
    surgery.save(tiny_model("llama", num_hidden_layers=2), byte_bpe(), tiny_dir)
    gguf = export_gguf(tiny_dir, tmp_path / "tiny-f16.gguf").path
    result = CliRunner().invoke(main, ["push", str(tiny_dir), "me/tiny", "--create-pr", "--gguf", str(gguf)])
    assert result.exit_code == 0, result.output
    assert "pull request: https://huggingface.co/me/tiny/discussions/2" in result.output
    assert api.calls[-1][2]["create_pr"] is True and api.calls[-1][2]["revision"] is None
    pushed = tmp_path / "hub" / "me" / "tiny" / "pr-2"
    assert (pushed / "tiny-f16.gguf").read_bytes() == gguf.read_bytes() and (pushed / "config.json").is_file()
    assert not (tmp_path / "hub" / "me" / "tiny" / "main").exists()  # nothing committed to main
    (tmp_path / "notes.txt").write_text("not a gguf")
    bad = CliRunner().invoke(main, ["push", str(tiny_dir), "me/tiny", "--gguf", str(tmp_path / "notes.txt")])
    assert bad.exit_code == 2 and "is not a GGUF file" in bad.stderr


@pytest.mark.parametrize(
    "patches, relation",
    [
        ([("gqa", {"num_kv_heads": 1})], "finetune"),
        ([("yarn", {"factor": 2})], "finetune"),
        ([("kv-quant", {"group_size": 16, "residual": 16})], "quantized"),
    ],
)
def test_the_card_header_names_the_base_and_how_the_model_derives_from_it(patches, relation):
    from surgery.hub import model_card
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    for name, params in patches:
        surgery.apply(model, name, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        header = ModelCard(model_card(model.config, "HuggingFaceTB/SmolLM2-135M-Instruct")).data.to_dict()
    assert header["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert header["base_model_relation"] == relation
    assert header["tags"] == ["surgery", patches[0][0]] and "model-index" not in header


def launch(recipe: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    """`surgery run RECIPE` under accelerate's multi-process launcher (torchrun), 2 processes;
    without a GPU they train on CPU over gloo."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "surgery.cli", "run", str(recipe)]
    proc = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_finetune_and_lm_eval_under_accelerate_with_two_processes(tiny_dir, tmp_path):
    harness = {"eval": "harness", "tasks": ["surgery_cloze", "surgery_rolling"], "limit": 5}
    steps = [harness, HEAL, {"save": str(tmp_path / "saved")}]
    proc = launch(write_recipe(tmp_path, tiny_dir, steps), tmp_path / "run", "--multi_gpu")
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert len(state["finetunes"][0]["losses"]) == 4 and state["finetunes"][0]["parallel"] == "data"
    assert state["finetunes"][0]["tokens"] == 4 * 2 * 32 * 2  # two processes, each its own batches
    assert proc.stdout.count("[2/3] finetune") == 1  # only the main process prints
    # lm-eval split the documents over both processes; the metrics are those of one process
    (result,) = [r for r in state["results"] if r["name"] == "harness"]
    assert result["details"]["processes"] == 2
    model, tokenizer = surgery.load_model(str(tiny_dir), dtype="float32")
    alone = make_eval("harness", tasks=harness["tasks"], limit=5).run(model, tokenizer)
    assert alone.details["processes"] == 1 and set(alone.metrics) == set(result["metrics"])
    for key, value in alone.metrics.items():
        assert result["metrics"][key] == pytest.approx(value, rel=1e-5), key
    before = load_file(tiny_dir / "model.safetensors")
    after = load_file(tmp_path / "saved" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".self_attn." in k for k in changed)


@pytest.mark.parametrize(
    "heal",
    [
        {"method": "full", "trainable": ["*.self_attn.*", "*norm*"]},
        {"method": "lora", "target_modules": ["q_proj", "v_proj", "down_proj"]},
    ],
    ids=["full", "lora"],
)
def test_fsdp_finetune_equals_one_process_of_the_same_global_batch(heal, tmp_path):
    # tied embeddings: the shared tensor is sharded once and gathered back into both names
    source = tmp_path / "tiny"
    surgery.save(tiny_model("llama", tie_word_embeddings=True), char_tokenizer(), source)
    config = ROOT / "configs" / "accelerate" / "fsdp-8gpu.yaml"
    runs = {}
    for processes, batch in ((2, 2), (1, 4)):  # 2 x 2 sequences per step, and 4 in one process
        settings = {
            **heal,
            "max_steps": 4,
            "seq_len": 32,
            "batch_size": batch,
            "learning_rate": 1e-2,
            "warmup_steps": 2,
        }
        saved = tmp_path / f"saved-{processes}"
        recipe = write_recipe(tmp_path, source, [{"finetune": settings}, {"save": str(saved)}], f"r{processes}.yaml")
        out = tmp_path / f"run-{processes}"
        if processes == 2:  # the shipped 8-GPU FSDP config, on 2 CPU processes
            proc = launch(recipe, out, "--config_file", str(config))
            assert "sharded (FSDP)" in proc.stdout
        else:
            result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(out)])
            assert result.exit_code == 0, result.output
        runs[processes] = (
            json.loads((out / "state.json").read_text())["finetunes"][0],
            load_file(saved / "model.safetensors"),
        )
    (sharded, fsdp_weights), (single, weights) = runs[2], runs[1]
    assert (sharded["parallel"], sharded["processes"], single["parallel"]) == ("fsdp", 2, "none")
    assert sharded["tokens"] == single["tokens"] == 4 * 4 * 32
    # the same loss curve: gradients averaged over 2 x 2 sequences are those of the 4 together
    assert torch.allclose(torch.tensor(sharded["losses"]), torch.tensor(single["losses"]), rtol=0, atol=1e-4)
    original = load_file(source / "model.safetensors")
    assert set(fsdp_weights) == set(weights) == set(original)  # a plain checkpoint: no adapter, no shard names
    moved = max((weights[k] - original[k]).abs().max().item() for k in weights)
    apart = max((weights[k] - fsdp_weights[k]).abs().max().item() for k in weights)
    assert moved > 1e-2 and apart < 1e-4, (moved, apart)  # trained, and to the same weights within float error
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved-2")  # stock transformers loads it
    assert torch.equal(reloaded.lm_head.weight, reloaded.model.embed_tokens.weight)


def test_a_model_that_does_not_load_leaves_nothing(tmp_path):
    path = write_recipe(tmp_path, tmp_path / "no-such-model", [PPL])
    result = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "no-such-model" in result.stderr, result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_lora_finetune_merges_back_into_a_plain_model(monkeypatch, caplog):
    import logging

    import surgery.io
    from surgery.recipes.finetune import Finetune, run_finetune

    monkeypatch.setattr(surgery.io, "LOG_EVERY", 0.0)  # a progress line per step (stderr is not a terminal)
    caplog.set_level(logging.INFO, logger="surgery.io")
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = Finetune(
        method="lora", max_steps=3, seq_len=32, batch_size=2, learning_rate=1e-2, target_modules=["q_proj", "v_proj"]
    )
    result = run_finetune(model, char_tokenizer(), settings, seed=1)
    # rank 16 adapters: q_proj 64->64 and v_proj 64->32 (2 kv heads of 16) on 2 layers
    assert len(result["losses"]) == 3 and result["trainable"] == 2 * (16 * (64 + 64) + 16 * (64 + 32))
    steps = [r.getMessage() for r in caplog.records if r.name == "surgery.io" and r.getMessage().startswith("finetune")]
    assert [line.split(",")[0] for line in steps] == [f"finetune: {i}/3 step" for i in (1, 2, 3)], steps
    assert steps[-1].endswith(f" left (loss {result['losses'][-1]:.3f})"), steps  # this step's loss
    assert type(model).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in model.named_modules())
    after = model.state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in ("q", "v")}
