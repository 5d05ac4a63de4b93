"""The non-finite-loss policy (train.nan_policy): skip = no update on any rank, exactly; and the
whole loop end to end with a NaN injected, its per-depth routing log and its console lines."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest

import ds_widenet  # noqa: F401  (selects DeepSpeed's CPU accelerator before deepspeed is imported)
from ds_widenet.runlog import read_metrics, split_metrics
from tests.distributed.launch import ROOT, child_env, write_ds_config

# --------------------------------------------------------------------------------------------
# nan_policy=skip on a real DeepSpeed engine


SKIP_SCRIPT = textwrap.dedent('''
    import json, sys, torch
    import ds_widenet
    from pathlib import Path
    import deepspeed
    from ds_widenet.config import ModelConfig, MoEConfig, OptimConfig, ScheduleConfig
    from ds_widenet.distributed import init_distributed
    from ds_widenet.deepspeed_internals import innermost_optimizer as _innermost_optimizer
    from ds_widenet.guards import NonFiniteGuard
    from ds_widenet.runlog import MetricsLog
    from ds_widenet.models import build_model
    from ds_widenet.optim import build_optimizer, build_scheduler, param_groups

    init_distributed()
    CFG = ModelConfig(arch="widenet", img_size=8, patch_size=2, in_chans=1, num_classes=5, embed_dim=16, depth=2,
                      num_heads=2, mlp_dim=32, moe=MoEConfig(num_experts=4, k=2, expert_dim=32, min_capacity=1))

    def snapshot(engine):
        inner = _innermost_optimizer(engine.optimizer)
        return ([p.detach().clone() for p in engine.module.parameters()],
                [torch.as_tensor(v).clone() for s in inner.state.values() for v in s.values()])

    def equal(a, b):
        return all(len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y)) for x, y in zip(a, b))

    def run(stage, mode, log_path, ga=2):
        model = build_model(CFG, seed=0)
        opt = build_optimizer(OptimConfig(lr=1e-2), param_groups(model, 0.05))
        sched = build_scheduler(opt, ScheduleConfig(max_steps=10, decay="linear"), 10, 0)
        engine, _, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config={
            "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": ga, "train_batch_size": 4 * ga,
            "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9})
        guard = NonFiniteGuard(engine, "skip", MetricsLog(Path(log_path), True))
        g = torch.Generator().manual_seed(0)
        flags = []  # the window's device flags, as the trainer keeps them

        def micro(step, nan):
            x = torch.randn(4, 1, 8, 8, generator=g)
            if nan:
                x[0, 0, 0, 0] = float("nan")  # NaN activations all the way to the loss
            out = engine(x)
            loss = out.logits.float().logsumexp(-1).mean() + 0.01 * out.aux_loss
            flags.append(guard.finite(loss))
            guard.backward(loss)
            skip = False
            if engine.is_gradient_accumulation_boundary():
                finite = guard.window_finite(flags)
                flags.clear()
                skip = not all(finite)
            if mode == "unguarded" and skip:  # the control: a normal optimizer step
                engine.step()
                return False
            if skip:
                assert guard.bad_window(step) is None  # skip policy, finite weights: logged, not stopped
            return guard.step(skip)

        for m in range(ga):
            micro(0, False)
        before = snapshot(engine)
        if mode == "reference":  # the same data drawn, no update, the schedule advanced as a skip does
            for m in range(ga):
                torch.randn(4, 1, 8, 8, generator=g)
            sched.step()
            skipped = []
        else:  # a NaN in the LAST micro-batch of the window: the earlier one's gradients must go too
            skipped = [micro(1, m == ga - 1) for m in range(ga)]
        after = snapshot(engine)
        for m in range(ga):
            micro(2, False)
        return {"skipped": skipped, "untouched": equal(before, after), "skipped_steps": engine.skipped_steps,
                "lr": sched.get_last_lr()[0], "final": snapshot(engine),
                "finite": all(bool(torch.isfinite(p).all()) for p in engine.module.parameters())}

    out = {}
    for stage in (0, 1, 2):
        a = run(stage, "skip", sys.argv[1])
        b = run(stage, "reference", sys.argv[1] + ".ref")
        out[stage] = {"skipped": a["skipped"], "untouched": a["untouched"], "skipped_steps": a["skipped_steps"],
                      "same_lr": a["lr"] == b["lr"], "same_next_step": equal(a["final"], b["final"]),
                      "finite": a["finite"]}
    c = run(0, "unguarded", sys.argv[1] + ".ctl")
    out["control_untouched"] = c["untouched"]
    print("RESULT " + json.dumps(out))
''')


@pytest.mark.timeout(300)
def test_skip_policy_leaves_weights_and_optimizer_state_exactly_as_if_the_step_never_happened(tmp_path):
    script = tmp_path / "skip_check.py"
    script.write_text(SKIP_SCRIPT)
    log = tmp_path / "m.jsonl"
    res = subprocess.run([sys.executable, str(script), str(log)], cwd=ROOT, env=child_env(), capture_output=True,
                         text=True, timeout=280, stdin=subprocess.DEVNULL)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, res.stdout[-2000:] + res.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    for stage in ("0", "1", "2"):
        r = out[stage]
        assert r["skipped"] == [False, True], (stage, r)  # skipped at the accumulation boundary
        assert r["untouched"], f"ZeRO-{stage}: weights or optimizer state changed in a skipped step"
        assert r["skipped_steps"] == 1 and r["same_lr"] and r["finite"], (stage, r)
        # the next step equals a run that never saw the poisoned window: no stale gradients
        assert r["same_next_step"], f"ZeRO-{stage}: the step after a skip differs from the reference"
    assert out["control_untouched"] is False  # without the suppression the step would have moved the weights
    warnings = [r for r in read_metrics(log) if "warning" in r]
    assert len(warnings) == 3 and warnings[0]["step"] == 2 and "skipped on every rank" in warnings[0]["warning"]


# --------------------------------------------------------------------------------------------
# End to end: the real training loop with a NaN injected into one micro-batch


TRAIN_WITH_NAN = textwrap.dedent('''
    import sys
    import ds_widenet.trainer as T
    from ds_widenet.train import main

    calls = {"n": 0}
    orig = T.soft_cross_entropy

    def poisoned(logits, targets):  # micro-batch 7 (step 4's first of 2) has a NaN loss
        calls["n"] += 1
        loss = orig(logits, targets)
        return loss * float("nan") if calls["n"] == 7 else loss

    T.soft_cross_entropy = poisoned
    sys.exit(main(sys.argv[1:]))
''')


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_short_run_logs_per_depth_routing_warns_and_skips_a_nan_step(tmp_path):
    from ds_widenet.report import make_report

    script = tmp_path / "train_with_nan.py"
    script.write_text(TRAIN_WITH_NAN)
    ds = write_ds_config(tmp_path / "ds.json", train_batch_size=64, train_micro_batch_size_per_gpu=32,
                         zero_optimization={"stage": 0})
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, str(script), "--recipe", str(ROOT / "ds_configs" / "digits_widenet.yaml"),
                          "--deepspeed_config", str(ds), "--out", str(out), "schedule.max_steps=20",
                          "train.log_interval=5", "train.eval_interval=10", "model.moe.capacity_factor=0.1",
                          "train.nan_policy=skip"],
                         cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=280, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-3000:]
    parts = split_metrics(read_metrics(out / "metrics.jsonl"))
    train, evals, warnings = parts["train"], parts["eval"], parts["warning"]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    for r in train:
        assert math.isfinite(r["loss"])
        assert len(r["expert_share"]) == 6 and all(len(row) == 4 for row in r["expert_share"])
        assert all(abs(sum(row) - 1) < 1e-3 for row in r["expert_share"])
        assert len(r["drop_rate"]) == 6 and all(d > 0.5 for d in r["drop_rate"])  # capacity factor 0.1
        assert len(r["router_entropy"]) == 6 and all(0 < h <= math.log(4) + 1e-6 for h in r["router_entropy"])
        assert len(r["aux_per_depth"]) == 6
    assert [r["skipped_steps"] for r in train] == [1, 1, 1, 1]
    texts = {w["step"]: w["warning"] for w in warnings}
    assert "drop rate above 0.3" in texts[5]
    assert "optimizer step 4 is skipped on every rank" in texts[4]
    # stdout is a pipe here, as in a cluster job's log file: one line per log step, evaluation and
    # warning (train.log_format=text, the default), then the final JSON line
    lines = res.stdout.splitlines()
    assert [ln.split(" | ")[0] for ln in lines if ln.startswith("step ")] == \
        ["step 5/20 (25%) epoch 0.23", "step 10/20 (50%) epoch 0.46", "step 15/20 (75%) epoch 0.68",
         "step 20/20 (100%) epoch 0.91"]
    assert all(" img/s" in ln and " ETA " in ln and "min expert share" in ln and "max drop" in ln
               for ln in lines if ln.startswith("step 1"))  # ETA from the second log step on
    assert [ln.split(" | ")[0] for ln in lines if ln.startswith("eval ")] == ["eval step 10 epoch 0.46",
                                                                           "eval step 20 epoch 0.91"]
    assert any(ln.startswith("warning at step 4: non-finite loss") for ln in lines)
    assert json.loads(lines[-1])["step"] == 20
    assert [r["step"] for r in evals] == [10, 20]
    for r in evals:
        assert len(r["eval_route_change"]) == 5 and all(0 <= v <= 1 for v in r["eval_route_change"])
        assert len(r["eval_router_entropy"]) == 6
    report = make_report(out).read_text()
    assert "## How routing differs across depths (evaluation at step 20)" in report
    assert "| 0 -> 1 |" in report and "## Warnings (2)" in report
    assert "| optimizer steps skipped (non-finite loss) | 1 |" in report
    for png in ("loss", "top1", "lr", "expert_load", "drop_rate", "router_entropy", "route_change"):
        assert (out / "report" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
