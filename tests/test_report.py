"""`python -m ds_widenet.report RUN_DIR`: plots and a Markdown summary from metrics.jsonl, for a
finished run, a run in progress (torn last line, no final.json) and a resumed one; one-line
errors with exit 2 for a missing run directory or metrics file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ds_widenet.report import main, make_report
from tests.distributed.launch import ROOT, child_env

PNG = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = ("loss", "top1", "lr", "expert_load", "drop_rate", "router_entropy", "route_change", "depth_diversity")


def train_row(step: int, loss: float, depth: int = 3, collapse: bool = False) -> dict:
    share = [[0.5, 0.5, 0.0, 0.0] if collapse else [0.25, 0.25, 0.3, 0.2] for _ in range(depth)]
    return {"step": step, "loss": loss, "aux_loss": 3.0, "lr": 1e-3 * step / 20, "images_per_sec": 100.0,
            "min_expert_share": 0.0 if collapse else 0.2, "expert_share": share, "drop_rate": [0.1 * d for d in range(depth)],
            "aux_per_depth": [1.0] * depth, "router_entropy": [1.3 - 0.1 * d for d in range(depth)], "skipped_steps": 1}


def eval_row(step: int, top1: float) -> dict:
    return {"step": step, "top1": top1, "eval_loss": 1.0 / step, "eval_images": 360, "eval_drop_rate": [0.0] * 3,
            "eval_router_entropy": [1.3, 1.2, 1.1], "eval_route_change": [0.4, 0.125],
            "eval_expert_share_per_depth": [[0.25, 0.25, 0.3, 0.2], [0.4, 0.1, 0.3, 0.2], [0.25] * 4],
            "eval_route_change_matrix": [[0.0, 0.4, 0.5], [0.4, 0.0, 0.125], [0.5, 0.125, 0.0]]}


def make_run(tmp_path: Path, rows: list[dict], torn: str = "", final: bool = False, name: str = "run") -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)
    (run / "recipe.json").write_text(json.dumps({"description": "a tiny test run", "model": {
        "arch": "widenet", "depth": 3, "embed_dim": 16, "moe": {"num_experts": 4, "k": 2, "router": "paper",
                                                                "capacity_factor": 1.2, "eval_capacity_factor": 2.0}}}))
    if final:
        (run / "final.json").write_text(json.dumps(rows[-1]))
    return run


def test_a_run_in_progress_gets_every_plot_and_a_summary_of_routing_and_warnings(tmp_path):
    rows = [train_row(5, 2.0), train_row(10, 1.5, collapse=True), eval_row(10, 0.5),
            {"step": 10, "warning": "expert share under 0.05 ..."}, train_row(15, 1.2), train_row(20, 1.0),
            eval_row(20, 0.75)]
    run = make_run(tmp_path, rows, torn='{"step": 25, "loss": 0.9, "aux_')
    md = make_report(run).read_text()
    for name in ALL_PLOTS:
        assert (run / "report" / f"{name}.png").read_bytes()[:8] == PNG, name
        assert f"]({name}.png)" in md
    assert "Status: in progress or stopped: last record at step 20" in md
    assert "| best test top-1 | 75.0% (step 20) |" in md
    assert "| last logged train loss | 1 (step 20) |" in md
    assert "## Routing per depth (log step 20)" in md
    assert "| 2 | 0.25 | 0.25 | 0.3 | 0.2 | 20.0% | 1.1 | 1 |" in md
    assert "## How routing differs across depths (evaluation at step 20)" in md
    assert "| 0 -> 1 | 40.0% |" in md and "| 1 -> 2 | 12.5% |" in md
    assert "## Warnings (1)" in md and "- step 10: expert share under 0.05" in md
    assert "a tiny test run" in md and "top-2 of 4 experts" in md


def test_a_finished_run_says_so_and_out_writes_elsewhere(tmp_path, capsys):
    run = make_run(tmp_path, [train_row(10, 1.0), eval_row(10, 0.9)], final=True)
    assert main([str(run), "--out", str(tmp_path / "elsewhere")]) == 0
    md = (tmp_path / "elsewhere" / "report.md").read_text()
    assert "Status: finished at step 10 (final.json)" in md
    assert (tmp_path / "elsewhere" / "expert_load.png").exists() and not (run / "report").exists()
    assert capsys.readouterr().out.strip() == str(tmp_path / "elsewhere" / "report.md")


def test_a_resumed_run_reports_the_records_it_logged_again(tmp_path):
    rows = [train_row(5, 2.0), train_row(10, 1.8), train_row(15, 1.7), {"step": 5, "event": "resumed from step5"},
            train_row(10, 1.4), eval_row(10, 0.6)]
    md = make_report(make_run(tmp_path, rows)).read_text()
    assert "| last logged train loss | 1.4 (step 10) |" in md
    assert "## Events" in md and "- step 5: resumed from step5" in md


def test_a_run_with_no_log_step_yet_gets_a_report_without_plots(tmp_path):
    run = make_run(tmp_path, [])
    md = make_report(run).read_text()
    assert "no training records yet" in md and "No plots yet" in md
    assert not list((run / "report").glob("*.png"))


def test_a_dense_vit_run_has_no_routing_plots(tmp_path):
    rows = [{"step": 5, "loss": 2.0, "aux_loss": 0.0, "lr": 1e-3}, {"step": 5, "top1": 0.3, "eval_loss": 2.0}]
    run = make_run(tmp_path, rows)
    make_report(run)
    assert sorted(p.stem for p in (run / "report").glob("*.png")) == ["loss", "lr", "top1"]


@pytest.mark.parametrize("setup,needle", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "holds no metrics.jsonl"),
])
def test_a_missing_run_or_metrics_file_is_a_one_line_error_with_exit_2(tmp_path, setup, needle):
    target = setup(tmp_path)
    res = subprocess.run([sys.executable, "-m", "ds_widenet.report", str(target)], cwd=ROOT, env=child_env(),
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr


def test_several_runs_compare_their_routing_across_depths_in_one_figure_and_table(tmp_path):
    a = make_run(tmp_path, [train_row(10, 1.0), eval_row(10, 0.5)], name="a")
    b = make_run(tmp_path, [train_row(10, 1.0), eval_row(10, 0.75)], name="b")
    rec = json.loads((b / "recipe.json").read_text())
    rec["model"]["moe"].update(router="expert_choice", per_depth_gate=True, z_loss_weight=0.001)
    (b / "recipe.json").write_text(json.dumps(rec))
    assert main([str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert (tmp_path / "cmp" / "depth_diversity.png").read_bytes()[:8] == PNG
    # consecutive pairs 0.4, 0.125 -> 26.2%; all pairs 0.4, 0.5, 0.125 -> 34.2%; smallest share 0.1 at depth 1
    assert "| a | router paper | 50.0% (10) | 26.2% | 34.2% | 0.100 (1) | 0.0% |" in md
    assert "| b | router expert_choice, per-depth gate, z-loss 0.001 | 75.0% (10) |" in md


def test_comparing_runs_needs_an_out_directory_and_evaluations(tmp_path, capsys):
    a = make_run(tmp_path, [train_row(10, 1.0), eval_row(10, 0.5)], name="a")
    b = make_run(tmp_path, [train_row(10, 1.0)], name="b")
    assert main([str(a), str(a)]) == 2
    assert "pass --out DIR" in capsys.readouterr().err
    assert main([str(a), str(b), "--out", str(tmp_path / "cmp")]) == 2
    assert "has no evaluation with per-depth routing" in capsys.readouterr().err
