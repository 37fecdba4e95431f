"""The results book: verdicts per paper claim from seed-level results, the page and its index."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alignlab.ablation import AblationSpec, load_spec
from alignlab.report.book import book_page, write_book_index

REPO = Path(__file__).resolve().parents[1]

SPEC = {
    "name": "toy", "base": {}, "seeds": [0, 1, 2],
    "arms": {"base": {}, "better": {"train.lr": 1e-3}, "worse": {"train.lr": 2e-3}, "same": {"train.lr": 3e-3},
             "absent": {"train.lr": 4e-3}},
    "baseline": "base",
    "paper": {"title": "Toy table", "source": "a paper, Table 1", "columns": {"acc": "m"},
              "rows": {"base": {"label": "CLIP", "values": {"acc": 50.0}}},
              "claims": [{"claim": "better beats base", "arm": "better", "metric": "m"},
                         {"claim": "worse beats base", "arm": "worse", "metric": "m"},
                         {"claim": "same beats base", "arm": "same", "metric": "m"},
                         {"claim": "absent beats base", "arm": "absent", "metric": "m"},
                         {"claim": "better beats worse", "arm": "better", "baseline": "worse", "metric": "m"}]},
}


def _records(arms: dict[str, list[float]]) -> list[dict]:
    return [{"arm": arm, "seed": seed, "metrics": {"m": value}}
            for arm, values in arms.items() for seed, value in enumerate(values)]


def _verdicts(page: str) -> dict[str, str]:
    rows = [line.split(" | ") for line in page.splitlines() if line.startswith("| ") and " beats " in line]
    return {row[0].lstrip("| "): row[3].strip("*") for row in rows}


def test_verdict_per_claim():
    spec = AblationSpec(**SPEC)
    # seed-paired: seed s shifts every arm alike, so the paired differences are tight
    records = _records({"base": [50, 60, 70], "better": [55.1, 65.3, 75.2], "worse": [44.8, 55.1, 64.9],
                        "same": [52, 58, 71]})
    page, status = book_page(spec, records, command="alignlab report toy.yaml --book", recipe="toy")
    verdicts = _verdicts(page)
    assert verdicts["better beats base"] == "reproduces"
    assert verdicts["worse beats base"] == "does not reproduce"
    assert verdicts["same beats base"] == "inconclusive at this scale"
    assert verdicts["absent beats base"] == "not run"
    assert verdicts["better beats worse"] == "reproduces"
    assert "n.s." in page and "| base | CLIP | 50.00 |" in page
    assert status.startswith("preliminary")  # the arm 'absent' has no seeds


def test_fewer_than_three_seeds_is_preliminary():
    spec = AblationSpec(**(SPEC | {"seeds": [0, 1]}))
    records = _records({"base": [50, 60], "better": [60, 70], "worse": [40, 50], "same": [50, 60],
                        "absent": [50, 60]})
    page, status = book_page(spec, records, command="c", recipe="r")
    assert status.startswith("preliminary")
    verdicts = _verdicts(page)
    assert len(verdicts) == 5 and all(v.endswith("(preliminary)") for v in verdicts.values())


def test_one_seed_shows_the_difference_without_an_interval_or_a_significance_mark():
    spec = AblationSpec(**(SPEC | {"seeds": [0]}))
    page, _ = book_page(spec, _records({"base": [50], "better": [57.5], "worse": [40], "same": [50],
                                        "absent": [50]}), command="c", recipe="r")
    row = next(line for line in page.splitlines() if line.startswith("| better | 1 |"))
    assert "(Δ +7.5, no test possible)" in row and "n.s." not in row and "[n/a" not in row


def test_values_below_one_keep_three_significant_digits():
    """A loss or a usage fraction (0.394 against 0.327) must not print as 0.4 against 0.3."""
    spec = AblationSpec(**(SPEC | {"seeds": [0]}))
    page, _ = book_page(spec, _records({"base": [0.39394], "better": [0.32698], "worse": [28.83], "same": [0.0],
                                        "absent": [0.05469]}), command="c", recipe="r")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in page.splitlines() if " | 1 | " in line}
    assert "| 0.394 ± n/a |" in rows["base"]
    assert "0.327 ± n/a (Δ -0.067, no test possible)" in rows["better"]
    assert "28.8 ± n/a (Δ +28.4, no test possible)" in rows["worse"]
    assert "0.0 ± n/a (Δ -0.394, no test possible)" in rows["same"]
    assert "0.0547 ± n/a" in rows["absent"]


def test_no_runs_yet_and_the_index(tmp_path):
    spec = AblationSpec(**SPEC)
    page, status = book_page(spec, [], command="c", recipe="r")
    assert status == "not run yet" and set(_verdicts(page).values()) == {"not run"}
    (tmp_path / "toy.md").write_text(page)
    (tmp_path / "demo.md").write_text("# Demo page\n\nstatus: **complete**\n")
    index = write_book_index(tmp_path).read_text()
    assert index.index("demo.md") < index.index("toy.md") and "not run yet" in index


def test_paper_claims_name_existing_arms():
    with pytest.raises(ValueError, match="nope"):
        AblationSpec(**(SPEC | {"paper": SPEC["paper"] | {"claims": [{"claim": "x", "arm": "nope", "metric": "m"}]}}))


@pytest.mark.parametrize("name", ["demo", "benchmark", "psd", "noise_sweep", "hn_nce", "diht", "cat", "thesis_shre_mlp", "thesis_ddp"])
def test_every_book_spec_has_a_paper_block(name):
    spec, _ = load_spec(REPO / "ablations" / f"{name}.yaml")
    assert spec.paper is not None and spec.paper.claims


def test_report_book_cli_writes_a_not_run_page(tmp_path, monkeypatch):
    from alignlab.cli import main

    monkeypatch.chdir(tmp_path)
    spec = dict(SPEC, base={"output_dir": str(tmp_path / "runs")})
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(spec))
    assert main(["report", "toy.yaml", "--book", "--book-dir", str(tmp_path / "book")]) == 0
    assert "not run yet" in (tmp_path / "book" / "toy.md").read_text()
    assert "toy.md" in (tmp_path / "book" / "README.md").read_text()


def _results_book_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results_book.py"
    spec = importlib.util.spec_from_file_location("results_book", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_book_script_runs_then_reports_each_spec_with_the_same_overrides(capsys):
    script = _results_book_script()
    assert script.main(["--dry-run", "--specs", "noise_sweep", "cat", "--seeds", "0", "data.synth.seed=3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert [line.split()[2:4] for line in lines] == [
        ["run", "ablations/noise_sweep.yaml"], ["report", "ablations/noise_sweep.yaml"],
        ["run", "ablations/cat.yaml"], ["report", "ablations/cat.yaml"]]
    for line in lines:
        assert "output_dir=runs" in line and "'seeds=[0]'" in line and "data.synth.seed=3" in line
    assert "--resume" in lines[0] and lines[1].endswith("--book --book-dir docs/results")


def test_results_book_script_refuses_an_unknown_spec_and_a_gpu_book_without_cuda(capsys):
    import torch

    script = _results_book_script()
    with pytest.raises(SystemExit):
        script.main(["--specs", "no_such_spec"])
    assert "--specs: no ablations/no_such_spec.yaml" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert script.main(["--gpu", "--specs", "demo"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert script.main(["--dry-run", "--gpu", "--specs", "demo"]) == 0
    assert "train.precision=amp_bf16" in capsys.readouterr().out
