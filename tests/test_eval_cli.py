"""`surgery eval` then `surgery compare` on a tiny model with a character tokenizer."""

from __future__ import annotations

import json

from click.testing import CliRunner

import surgery
from surgery.cli import main
from tests.conftest import char_tokenizer, tiny_model


def test_eval_writes_results_report_and_plot_then_compare_gates(tmp_path):
    model = tiny_model("llama")
    surgery.save(model, char_tokenizer(), tmp_path / "base")
    stretched = tiny_model("llama")
    surgery.apply(stretched, "linear", factor=4)
    surgery.save(stretched, char_tokenizer(), tmp_path / "linear4")
    runner = CliRunner()
    for name in ("base", "linear4"):
        result = runner.invoke(
            main,
            [
                "eval",
                str(tmp_path / name),
                "--eval",
                "perplexity lengths=32,128 band=64",
                "-o",
                str(tmp_path / f"{name}-eval"),
            ],
        )
        assert result.exit_code == 0, result.output
        assert "perplexity.ppl@128 = " in result.output
        assert {p.name for p in (tmp_path / f"{name}-eval").iterdir()} == {
            "results.json",
            "report.md",
            "perplexity.png",
            "surgery.json",  # the mark that lets --force replace it
        }
    saved = json.loads((tmp_path / "base-eval" / "results.json").read_text())
    assert set(saved["results"][0]["metrics"]) == {
        "perplexity.ppl@32",
        "perplexity.ppl@128",
        "perplexity.band_ppl@0-64",
        "perplexity.band_ppl@64-127",
    }
    cmp = runner.invoke(
        main,
        [
            "compare",
            str(tmp_path / "base-eval"),
            str(tmp_path / "linear4-eval"),
            "--gate",
            "perplexity.ppl@128:max_increase=1000%",
            "-o",
            str(tmp_path / "cmp"),
        ],
    )
    assert cmp.exit_code == 0, cmp.output
    assert (tmp_path / "cmp" / "perplexity.png").stat().st_size > 10_000


def test_eval_refuses_bad_specs_before_loading(tmp_path):
    runner = CliRunner()
    for spec, message in [
        ("perplex", "unknown eval 'perplex'; did you mean 'perplexity'?"),
        ("perplexity lengths", "bad eval parameter 'lengths'"),
        ("perplexity lengths=1", "lengths must be"),
        ("perplexity chunks=8", "did you mean 'chunk'"),
    ]:
        result = runner.invoke(main, ["eval", "./does-not-exist", "--eval", spec, "-o", str(tmp_path / "o")])
        assert result.exit_code == 2 and message in result.stderr, (spec, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
