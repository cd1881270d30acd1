"""surgery check: the battery follows the patch records, verdicts map to exit codes 0/1/3, bad
input is one line and exit 2, and on the embedded model a round trip passes while mean-pooled MQA
fails."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import surgery
from surgery.check import plan
from surgery.cli import main
from surgery.recipes import load_recipe, run_recipe
from tests.conftest import char_tokenizer, tiny_config, tiny_model

LENGTH = ["--length", "256"]


@pytest.fixture
def original(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "original"
    surgery.save(tiny_model("llama", max_position_embeddings=1024), char_tokenizer(), out)
    return out


def apply(args: list[str]) -> None:
    result = CliRunner().invoke(main, ["apply", *args])
    assert result.exit_code == 0, result.output


def check(*args: str):
    return CliRunner().invoke(main, ["check", *args])


def record(name: str, **params) -> dict:
    diff = {"max_position_embeddings": {"before": 8192, "after": params.pop("new")}} if "new" in params else {}
    return {
        "name": name,
        "params": params,
        "config_diff": diff,
        "persist": "config",
        "parameters_before": 0,
        "parameters_after": 0,
        "kv_bytes_per_token_before": 0,
        "kv_bytes_per_token_after": 0,
    }


@pytest.mark.parametrize(
    "records, evals",
    [
        ([], ["divergence", "divergence"]),
        ([record("attention", impl="eager")], ["divergence", "divergence"]),
        ([record("kv-quant", bits=2)], ["divergence", "divergence", "divergence", "ruler"]),
        ([record("gqa", num_kv_heads=1)], ["divergence", "divergence", "ruler"]),
        ([record("mla", kv_rank=96)], ["divergence", "divergence", "ruler"]),
        ([record("sliding-window", window=256)], ["divergence", "divergence", "ruler"]),
        ([record("yarn", factor=2, new=16384)], ["divergence", "divergence", "ruler"]),
    ],
)
def test_battery_follows_the_patch_records(records, evals):
    battery = plan(tiny_config("llama", max_position_embeddings=8192), records, reference="x")
    assert [it.eval.name for it in battery.items] == evals
    assert battery.length == 4096
    texts = {it.eval.text for it in battery.items if it.eval.name == "divergence"}
    assert texts == {"pydoc", "docs"}  # always a second domain
    assert sum(g.startswith("divergence.docs.") for g in battery.gates) == 2
    if "ruler" in evals:
        ruler = next(it.eval for it in battery.items if it.eval.name == "ruler")
        assert len(ruler.depths) * ruler.trials >= 43  # Wilson ±0.15 per task at full budget
        assert any(g.startswith("ruler.avg@4096:max_decrease") for g in battery.gates)
    if records and records[0]["name"] == "kv-quant":  # through the cache, under its own metric names
        assert any(it.eval.name == "divergence" and it.eval.chunk == 512 for it in battery.items)
        assert "divergence.pydoc-chunk512.kl@4096:max=0.1,confidence=0.95" in battery.gates
    if records and records[0]["name"] == "yarn":  # 16k is not checked by default: said so
        assert "--length 16384" in " ".join(battery.notes)
        far = plan(tiny_config("llama", max_position_embeddings=8192), records, length=16384)
        assert far.length == 8192  # divergence within the original context, and said so ...
        assert far.notes == [
            "the original is compared within its 8192 positions; the patched model alone is judged at 16384"
        ]
        past = [(it.eval.name, it.original) for it in far.items if not it.original]
        assert ("ruler", False) in past and ("perplexity", False) in past  # ... tasks and bands past it


def test_a_domain_the_model_never_saw_is_always_checked():
    cfg = tiny_config("llama", max_position_embeddings=8192)
    texts = lambda b: [it.eval.text for it in b.items if it.eval.name == "divergence"]  # noqa: E731
    assert texts(plan(cfg, [], trained={"pydoc"})) == ["pydoc", "docs"]  # docs is unseen
    both = plan(cfg, [], trained={"pydoc", "docs"})
    assert texts(both) == ["pydoc", "docs", "licenses"] and "licenses joins" in both.notes[0]
    assert "divergence.licenses.kl@4096:max=0.1,confidence=0.95" in both.gates
    every = plan(cfg, [], trained={"pydoc", "docs", "licenses"})
    assert "add an eval on a text it never saw" in every.notes[0]


def test_check_reads_what_the_saved_recipe_trained_on(original, tmp_path):
    """A model saved by a recipe that fine-tuned on pydoc and docs is checked on licenses too; a
    recipe.yaml that does not validate (or carries a Python tag) is reported, never run."""
    from surgery.recipes.schema import recipe_trained

    patched = tmp_path / "patched"
    surgery.save(*surgery.load_model(str(original)), patched)
    steps = [{"finetune": {"method": "full", "max_steps": 1, "text": ["pydoc", "docs"]}}, {"save": "x"}]
    (patched / "recipe.yaml").write_text(yaml.safe_dump({"model": str(original), "steps": steps}))
    assert recipe_trained(str(patched)) == ({"pydoc", "docs"}, None)
    result = check(str(original), str(patched), *LENGTH, "--budget", "0.1", "-o", str(tmp_path / "report"))
    assert "licenses" in result.output and "divergence.licenses.kl@256" in result.output, result.output
    (patched / "recipe.yaml").write_text("model: !!python/object/apply:os.system ['touch pwned']\nsteps: []\n")
    trained, note = recipe_trained(str(patched))
    assert trained == set() and "could not read" in note and not Path("pwned").exists()
    check(str(original), str(patched), *LENGTH, "--budget", "0.1", "-o", str(tmp_path / "unread"))
    assert "could not read" in (tmp_path / "unread" / "report.md").read_text()  # the report says so, not only stderr


def test_budget_scales_samples():
    cfg = tiny_config("llama", max_position_embeddings=8192)
    full, small = plan(cfg, [record("gqa", num_kv_heads=1)]), plan(cfg, [record("gqa", num_kv_heads=1)], scale=0.1)
    assert full.items[0].eval.samples == 8 and small.items[0].eval.samples == 2
    assert full.items[-1].eval.trials == 9 and small.items[-1].eval.trials == 1
    assert len(full.items[-1].eval.depths) == 5 and len(small.items[-1].eval.depths) == 3


def test_benign_change_passes_and_writes_a_report(original, tmp_path):
    apply(["attention", "--impl", "eager", str(original), "-o", str(tmp_path / "eager")])
    result = check(str(original), str(tmp_path / "eager"), *LENGTH, "-o", str(tmp_path / "report"))
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("PASS")
    assert "--gate 'divergence.docs.kl@256:max=0.1,confidence=0.95'" in result.output  # printed to copy
    payload = json.loads((tmp_path / "report" / "check.json").read_text())
    assert payload["status"] == "pass" and len(payload["gates"]) == 4
    assert (tmp_path / "report" / "divergence.png").stat().st_size > 10_000
    assert "KL divergence by position" in (tmp_path / "report" / "report.md").read_text()


def test_regression_exits_1_and_inconclusive_exits_3(original, tmp_path):
    """Tight user gates show both verdicts on the eager swap, whose KL is float noise (~5e-7); a
    user's gate on a default gate's metric replaces the default."""
    apply(["attention", "--impl", "eager", str(original), "-o", str(tmp_path / "mqa")])
    out = tmp_path / "r1"
    fail = check(
        str(original), str(tmp_path / "mqa"), *LENGTH, "-o", str(out), "--gate", "divergence.*.kl@256:max=1e-9"
    )
    assert fail.exit_code == 1, fail.output
    assert fail.output.strip().splitlines()[-1].startswith("FAIL")
    unsure = check(
        str(original),
        str(tmp_path / "mqa"),
        *LENGTH,
        "-o",
        str(tmp_path / "r2"),
        "--gate",
        "divergence.pydoc.kl@256:max=" + str(_kl(out)) + ",confidence=0.95",
    )
    assert unsure.exit_code == 3, unsure.output
    assert "INCONCLUSIVE" in unsure.output and "samples" in unsure.output


def _kl(report: Path) -> float:
    results = json.loads((report / "patched.json").read_text())["results"]
    return next(r["metrics"]["divergence.pydoc.kl@256"] for r in results if r["params"]["text"] == "pydoc")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gate", "divergence.kl:max"], "needs a number"),
        (["--budget", "0"], "0"),
        (["--dtype", "float13"], "float13"),
        (["--gate", "needle.acc@256:min=0.5"], "this check runs no needle eval"),
        (["--gate", "divergence.pydoc.kl@999:max=0.1"], "measures at 256 tokens, not 999"),
        (["--gate", "divergence.wiki.kl@256:max=0.1"], "measures divergence on docs, pydoc, not wiki"),
        (["--gate", "divergence.kl@256:max=0.1"], "not kl"),
    ],
)
def test_bad_arguments_are_one_line(original, args, message, tmp_path):
    shutil.copytree(original, tmp_path / "twin")  # the same model twice is refused on its own
    result = check(str(original), str(tmp_path / "twin"), *LENGTH, *args)
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_missing_model_is_one_line(original, tmp_path):
    result = check(str(original), str(tmp_path / "nope"))
    assert result.exit_code == 2 and "nope" in result.output and len(result.output.strip().splitlines()) == 1


def test_check_step_in_a_recipe(original, tmp_path):
    steps = [{"patch": "attention", "impl": "eager"}, {"check": {"length": 256}}, {"save": str(tmp_path / "saved")}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": str(original), "dtype": "float32", "steps": steps}))
    lines: list[str] = []
    outcome = run_recipe(load_recipe(path), tmp_path / "run", echo=lines.append)
    assert outcome.passed and outcome.state.status == "pass", "\n".join(lines)
    assert any("PASS" in line for line in lines) and (tmp_path / "saved" / "config.json").is_file()
    assert "divergence.docs.kl@256" in outcome.table
    strict = tmp_path / "strict.yaml"
    steps[1] = {"check": {"length": 256, "gate": ["divergence.*.kl@256:max=-1"]}}
    steps[2] = {"save": str(tmp_path / "saved2")}
    strict.write_text(yaml.safe_dump({"model": str(original), "dtype": "float32", "steps": steps}))
    outcome = run_recipe(load_recipe(strict), tmp_path / "run2", echo=lines.append)
    assert outcome.state.status == "fail" and not (tmp_path / "saved2").exists()


def test_validate_finds_a_bad_check_step_before_loading(original, tmp_path):
    path = tmp_path / "recipe.yaml"

    def validate(check: dict) -> tuple[int, str]:
        steps = [{"patch": "attention", "impl": "eager"}, {"check": check}]
        path.write_text(yaml.safe_dump({"model": str(original), "steps": steps}))
        result = CliRunner().invoke(main, ["validate", str(path), "--model", str(original)])
        return result.exit_code, result.output

    code, output = validate({"length": 256})
    assert code == 0 and "dry run steps.1 check: divergence, divergence" in output, output
    code, output = validate({"original": str(tmp_path / "gone")})
    assert code == 2 and "steps.1.check" in output and "gone" in output, output
    code, output = validate({"length": 256, "gate": ["ruler.avg@256:min=0.5"]})
    assert code == 2 and "steps.1.check: gate 'ruler.avg@256:min=0.5': this check runs no ruler eval" in output
    steps = [{"finetune": {"method": "full", "max_steps": 1, "text": "pydoc+docs"}}, {"check": {"length": 256}}]
    path.write_text(yaml.safe_dump({"model": str(original), "steps": steps}))
    result = CliRunner().invoke(main, ["validate", str(path), "--model", str(original)])
    assert "dry run steps.1 check: divergence, divergence, divergence" in result.output, result.output


def test_validate_warns_when_a_gate_reads_the_training_text(original, tmp_path):
    steps = [
        {"eval": "perplexity", "lengths": [64]},
        {"finetune": {"method": "full", "max_steps": 1, "seq_len": 32}},
        {"eval": "perplexity", "lengths": [64]},
        {"gate": "perplexity.ppl@64:max=1000"},
    ]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": str(original), "steps": steps}))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0 and "warning: steps.3.gate 'perplexity.ppl@64' is measured on pydoc" in result.output
    steps[2]["text"] = "docs"
    path.write_text(yaml.safe_dump({"model": str(original), "steps": steps}))
    assert "warning" not in CliRunner().invoke(main, ["validate", str(path)]).output
    # an in-domain gate beside one on text no step trained on (the shipped MQA heal's shape)
    steps[2]["text"] = "pydoc"
    steps[3:] = [
        {"eval": "divergence", "text": "licenses", "length": 64, "samples": 1},
        {"gate": ["perplexity.ppl@64:max=1000", "divergence.licenses.ppl_ratio@64:max=6"]},
    ]
    path.write_text(yaml.safe_dump({"model": str(original), "steps": steps}))
    assert "warning" not in CliRunner().invoke(main, ["validate", str(path)]).output


# ---------------------------------------------------------------- the embedded model


@pytest.mark.heavy
def test_embedded_round_trip_passes_and_mean_mqa_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    model, tokenizer = surgery.load_model("smollm2", dtype="float32")
    surgery.save(model, tokenizer, tmp_path / "copy")
    surgery.apply(model, "mqa")
    surgery.save(model, tokenizer, tmp_path / "mqa")
    del model
    args = ["--length", "512", "--budget", "1"]
    same = check("smollm2", str(tmp_path / "copy"), *args, "-o", str(tmp_path / "r1"))
    assert same.exit_code == 0, same.output
    mqa = check("smollm2", str(tmp_path / "mqa"), *args, "-o", str(tmp_path / "r2"))
    assert mqa.exit_code == 1, mqa.output
    gates = json.loads((tmp_path / "r2" / "check.json").read_text())["gates"]
    failed = {g["metric"] for g in gates if g["status"] == "fail"}
    assert {"divergence.pydoc.kl@512", "divergence.docs.kl@512"} <= failed


@pytest.mark.heavy  # the tasks need 1024-token prompts: ~1 minute on 2 cores
def test_an_mla_checkpoint_runs_the_battery_and_its_loss_is_measured(original, tmp_path):
    """A latent of 4 channels for 2 kv heads x 16 x (k, v): the DeepseekV3 checkpoint runs through
    the whole battery (divergence on two domains, then the tasks). The tiny random original is
    near-uniform (perplexity ~126 of 128 tokens), so its default gates have little to lose; a gate
    at the full-rank conversion's float noise catches the loss."""
    apply(["mla", "--kv-rank", "4", "--rope-dim", "4", "--method", "svd", str(original), "-o", str(tmp_path / "mla")])
    length = ["--length", "1024"]  # the tasks' prompts need ~920 tokens
    gate = ["--gate", "divergence.*.kl@1024:max=1e-6"]
    result = check(str(original), str(tmp_path / "mla"), *length, *gate, "--budget", "0.1", "-o", str(tmp_path / "r"))
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1].startswith("FAIL")
    assert "ruler.avg@1024:max_decrease=0.1" in result.output and "ruler.avg@1024 " in result.output
    assert json.loads((tmp_path / "r" / "check.json").read_text())["status"] == "fail"
