"""Rank 0's console: one line per log step / evaluation / warning / event off a terminal
(`train.log_format=text`), the records themselves (`json`), nothing (`off`), a bar on a terminal."""
from __future__ import annotations

import io
import json

from ds_widenet.runlog import Console, MetricsLog, eval_line, monitor_events, read_metrics, split_metrics, train_line

TRAIN = {"step": 40, "epoch": 1.818, "loss": 1.23456, "aux_loss": 1.01, "lr": 9.1e-4, "images_per_sec": 955.2,
         "grad_norm": 0.5, "min_expert_share": 0.2134, "drop_rate": [0.01, 0.042, None], "skipped_steps": 0}
EVAL = {"step": 44, "epoch": 2.0, "top1": 0.9361111, "eval_loss": 0.2345, "eval_images": 360,
        "eval_min_expert_share": 0.231, "eval_drop_rate": [0.0, 0.003], "train_seconds": 75.0}


def test_a_log_step_line_has_progress_loss_lr_throughput_eta_and_routing_health():
    line = train_line({**TRAIN, "mfu": 0.412}, 220, eta_s=192)
    assert line == ("step 40/220 (18%) epoch 1.82 | loss 1.2346 aux 1.0100 | lr 9.10e-04 | 955 img/s | MFU 41.2% | "
                    "ETA 3m12s | min expert share 0.213 max drop 0.042")
    assert "MFU" not in train_line(TRAIN, 220, None) and "ETA" not in train_line(TRAIN, 220, None)
    assert "loss - aux -" in train_line({**TRAIN, "loss": None, "aux_loss": None}, 220, None)  # every micro-batch skipped


def test_an_evaluation_line_has_top1_with_counts_and_routing_health():
    assert eval_line(EVAL) == ("eval step 44 epoch 2.00 | top-1 0.9361 (337/360) | loss 0.2345 | "
                               "min expert share 0.231 max drop 0.003 | 1m15s training")


def test_text_format_prints_records_warnings_and_events_on_one_stream_with_an_eta(tmp_path):
    out = io.StringIO()
    log = MetricsLog(tmp_path / "m.jsonl", True, console=Console("text", 220, 0, stream=out))
    log.write(TRAIN)
    log.write({**TRAIN, "step": 60})
    log.write(EVAL, prefix="Eval")
    log.warn(61, "drop rate above 0.3")
    log.event(61, "resumed from x")
    lines = out.getvalue().splitlines()
    assert [ln.split(" | ")[0] for ln in lines] == ["step 40/220 (18%) epoch 1.82", "step 60/220 (27%) epoch 1.82",
                                                    "eval step 44 epoch 2.00", "warning at step 61: drop rate above 0.3",
                                                    "event at step 61: resumed from x"]
    assert "ETA" not in lines[0] and "ETA" in lines[1]
    assert len(read_metrics(tmp_path / "m.jsonl")) == 5  # the file gets every record whatever the console


def test_json_format_prints_the_metrics_records(tmp_path):
    out = io.StringIO()
    log = MetricsLog(tmp_path / "m.jsonl", True, console=Console("json", 220, 0, stream=out))
    log.write(TRAIN)
    log.warn(41, "w")
    rows = [json.loads(ln) for ln in out.getvalue().splitlines()]
    assert rows[0]["loss"] == TRAIN["loss"] and rows[0]["step"] == 40 and "time" in rows[0]
    assert rows[1] == {"step": 41, "warning": "w"}


def test_off_format_prints_nothing_on_stdout_and_leaves_warnings_to_logging(tmp_path, caplog):
    out = io.StringIO()
    log = MetricsLog(tmp_path / "m.jsonl", True, console=Console("off", 220, 0, stream=out))
    log.write(TRAIN)
    log.event(1, "e")
    log.warn(2, "careful")
    assert out.getvalue() == ""
    assert [r.getMessage() for r in caplog.records] == ["step 2: careful"]  # stderr in a CLI run


def test_on_a_terminal_the_bar_replaces_step_lines_and_messages_go_through_it(tmp_path):
    out = io.StringIO()
    console = Console("text", 10, 0, bar=True, stream=out)
    console.bar.fp = io.StringIO()  # the bar itself draws elsewhere (stderr); only messages reach `out`
    log = MetricsLog(tmp_path / "m.jsonl", True, console=console)
    log.write(TRAIN)
    console.advance()
    log.warn(3, "careful")
    console.close()
    assert out.getvalue().splitlines() == ["warning at step 3: careful"]


def test_other_ranks_print_nothing(tmp_path):
    out = io.StringIO()
    log = MetricsLog(tmp_path / "m.jsonl", False, console=Console("text", 10, 0, stream=out))
    log.write(TRAIN)
    log.warn(1, "w")
    assert out.getvalue() == "" and not (tmp_path / "m.jsonl").exists()


# --------------------------------------------------------------------------------------------
# Records and monitors


def test_monitor_events_skip_non_numbers_and_booleans():
    names = [n for n, _, _ in monitor_events({"step": 1, "warning": "x", "flag": True, "nan": float("nan"), "v": 2})]
    assert names == ["Train/v"]


def test_a_resumed_run_replaces_the_steps_it_logged_again():
    rows = [{"step": 5, "loss": 3.0}, {"step": 10, "loss": 2.0}, {"step": 10, "top1": 0.2},
            {"step": 15, "loss": 1.9}, {"step": 10, "event": "resumed"}, {"step": 15, "loss": 1.5},
            {"step": 20, "loss": 1.0}, {"step": 12, "warning": "w"}]
    parts = split_metrics(rows)
    assert [(r["step"], r["loss"]) for r in parts["train"]] == [(5, 3.0), (10, 2.0), (15, 1.5), (20, 1.0)]
    assert len(parts["eval"]) == 1 and len(parts["event"]) == 1 and len(parts["warning"]) == 1


def test_read_metrics_ignores_a_torn_last_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(p) == [{"step": 1, "loss": 2.0}]
