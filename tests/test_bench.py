"""Smoke tests of bench/: throughput JSON, the FLOP formula, the activation estimate, the profiler
ranges, the projection model and the layout advisor (fast), and one 2-rank sweep point (slow)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from tests.support import launch as testing  # noqa: E402
from ds_widenet.flops import activation_bytes, capacity, measure_saved_bytes, step_flops  # noqa: E402

torch = common.torch


def tiny_widenet(**kw):
    # 8x8 single-channel images, 4x4 patches -> N = T = 4 tokens (average pooling), d 8, 2 depths,
    # 4 experts of width 16, top-2, capacity factor 1.2 (the default), 3 classes.
    from ds_widenet.config import ModelConfig, MoEConfig

    moe = MoEConfig(num_experts=4, k=2, expert_dim=16, **kw.pop("moe", {}))
    return ModelConfig(arch="widenet", img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=2,
                       num_heads=2, mlp_dim=16, moe=moe, pool="avg", **kw)


def child_env() -> dict[str, str]:
    return testing.child_env(ROOT)


def test_throughput_json(tmp_path):
    out = tmp_path / "t.json"
    cmd = [sys.executable, "bench/throughput.py", "--preset", "widenet-digits", "--batch", "4", "--steps", "2",
           "--warmup", "1", "--threads", "1", "--peak-sizes", "64", "128", "--peak-seconds", "0.01",
           "--json", str(out), "model.depth=1"]
    res = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    d = json.loads(out.read_text())
    for key in ("images_per_s", "tokens_per_s", "model_flops_per_s", "executed_flops_per_s", "utilization",
                "utilization_executed"):
        assert d[key] > 0, key
    assert d["matmul_peak"]["flops_per_s"] > 0 and set(d["matmul_peak"]["by_size_flops_per_s"]) == {"64", "128"}
    assert d["step_time_s"]["n"] == 2 and d["step_time_s"]["median"] > 0
    assert d["model"]["depth"] == 1 and d["overrides"] == ["model.depth=1"]
    assert d["tokens_per_s"] == pytest.approx(d["images_per_s"] * 16)  # 8x8 digits, 2x2 patches
    assert d["flops_per_step"]["executed"] >= d["flops_per_step"]["model"] > 0
    assert d["machine"]["cpu_model"] and d["machine"]["nproc"] >= 1 and d["threads"] == 1
    assert d["command"].startswith("python bench/throughput.py")


def test_throughput_compile_times_compiled_and_eager_side_by_side(tmp_path):
    # aot_eager: the traced graphs without C++ (inductor is the default, ~50 s cold here)
    out = tmp_path / "c.json"
    cmd = [sys.executable, "bench/throughput.py", "--preset", "widenet-digits", "--batch", "4", "--steps", "2",
           "--warmup", "1", "--threads", "1", "--peak-sizes", "64", "--peak-seconds", "0.01", "--compile",
           "--compile-backend", "aot_eager", "--json", str(out), "model.depth=1", "model.embed_dim=32",
           "model.num_heads=2", "model.moe.expert_dim=32"]
    res = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    d = json.loads(out.read_text())
    c = d["compiled"]
    assert c["backend"] == "aot_eager" and c["step_time_s"]["n"] == d["step_time_s"]["n"] == 2
    assert c["step_time_ratio"] == pytest.approx(c["step_time_s"]["median"] / d["step_time_s"]["median"])
    assert len(c["compile_steps_s"]) == 2 and c["compile_s"] > 0  # warm-up raised to 2 steps
    assert (c["graphs_compiled"], c["graph_breaks"], c["recompiles_while_timed"]) == (1, 0, 0)
    assert c["max_param_diff"] < 1e-5  # the same steps on the same model
    assert "compiled (aot_eager)" in res.stdout


def test_throughput_refuses_bad_override():
    from bench.throughput import main

    assert main(["--preset", "widenet-digits", "model.arch=resnet"]) == 2


def test_flops_match_hand_count():
    cfg = tiny_widenet()
    b = 2  # S = 8 tokens
    # forward multiply-adds:
    embed = 2 * 4 * 16 * 8  # B*N*P*d = 1024
    attn = 3 * 8 * 8 * 8 + 2 * 8 * 4 * 8 + 8 * 8 * 8  # qkv + (QK^T, AV) + proj = 2560 per depth
    router = 8 * 8 * 4  # S*d*E = 256 per depth
    experts = 2 * 8 * 2 * 8 * 16  # k*S*2*d*h_e = 4096 per depth
    head = 2 * 8 * 3  # 48
    fwd = embed + 2 * (attn + router + experts) + head  # 14896
    assert fwd == 14896
    f = step_flops(cfg, b)
    assert f["forward"] == 2 * fwd
    assert f["train"] == 2 * (3 * fwd - embed) == 87328  # backward 2x, the patch embed 1x
    # executed, padded (DeepSpeed's Experts, the fallback): capacity ceil(8/4 * 1.2 * 2) = 5 slots per
    # expert, 20 slots instead of k*S = 16; grouped: at most the k*S = 16 filled rows
    assert capacity(cfg, 8) == 5
    fwd_exe = fwd + 2 * (4 * 5 * 2 * 8 * 16 - experts)
    assert step_flops(cfg, b, padded=True)["train_executed"] == 2 * (3 * fwd_exe - embed) == 99616
    # grouped: the k*S = 16 filled rows, each with the biases as a ones column padded to a 16-byte row
    # (fp32: 4 columns after d = 8 and after h_e = 16; bf16: 8), MACs forward and in the weight
    # gradient (FLOPs: 2 per MAC, 2 passes, 2 depths)
    bias = 4 * 16 + 4 * 8
    assert f["train_executed"] == f["train"] + 2 * 2 * 2 * 16 * bias == 99616
    assert step_flops(cfg, b, element_size=2)["train_executed"] == f["train"] + 2 * 2 * 2 * 16 * (8 * 16 + 8 * 8)
    # capacity factor 0.5, min_capacity 2: 4 * 2 = 8 slots, fewer than the 16 routes: the bound is the slots
    tight = tiny_widenet(moe={"capacity_factor": 0.5, "min_capacity": 2})
    assert capacity(tight, 8) == 2
    assert step_flops(tight, b)["train_executed"] == (87328 - 2 * 3 * 2 * (2 * 8 - 4 * 2) * 2 * 8 * 16
                                                      + 2 * 2 * 2 * 8 * bias)
    layers = {lc["name"]: lc for lc in f["layers"]}
    assert layers["attention"]["calls"] == 2 and layers["moe_experts"]["calls"] == 2
    assert layers["patch_embed"]["bwd_factor"] == 1 and layers["moe_expert_bias"]["fwd_flops_per_call"] == 0
    # capacity factor 1.0: the experts multiply exactly k*S rows
    assert step_flops(tiny_widenet(moe={"capacity_factor": 1.0}), b)["train_executed"] == 87328 + 2 * 2 * 2 * 16 * bias


def test_flops_agree_with_torch_flop_counter():
    """With attention dropout the attention runs as explicit matmuls, which FlopCounterMode sees (and
    the grouped expert matmuls, through their registered formulas: their real row counts). With
    capacity for every route the executed count must equal torch's count of a real forward +
    backward; with drops, torch's count is below the bound by the dropped routes' work."""
    from torch.utils.flop_counter import FlopCounterMode

    from ds_widenet.models import build_model

    def counted(cfg):
        model = build_model(cfg)
        model.train()
        x = torch.randn(3, cfg.in_chans, cfg.img_size, cfg.img_size)
        counter = FlopCounterMode(display=False)
        with counter:
            out = model(x)
            (out.logits.sum() + out.aux_loss).backward()
        return counter.get_total_flops()

    roomy = tiny_widenet(attn_dropout=0.1, moe={"capacity_factor": 8.0})
    vit_moe = common.model_config("vit-moe-digits", ["model.attn_dropout=0.1", "model.depth=3", "model.moe_last_n=1",
                                                     "model.pool=cls", "model.moe.capacity_factor=8.0"])
    for cfg in (roomy, vit_moe):
        assert counted(cfg) == step_flops(cfg, 3)["train_executed"], cfg.arch
    tight = tiny_widenet(attn_dropout=0.1, moe={"capacity_factor": 0.5, "min_capacity": 1})
    d, h = tight.embed_dim, tight.moe.expert_dim  # fwd + bwd FLOPs of one routed token, bias columns included
    per_route = 3 * 2 * 2 * d * h + 2 * 2 * (4 * h + 4 * d)
    bound, n = step_flops(tight, 3)["train_executed"], counted(tight)
    assert bound < step_flops(tight, 3)["train"] and n <= bound and (bound - n) % per_route == 0


def test_activation_estimate_matches_saved_tensors():
    from ds_widenet.models import build_model

    for preset in ("widenet-digits", "vit-digits", "vit-moe-digits"):
        cfg = common.model_config(preset, ["model.depth=2", "model.moe_last_n=1"] if "moe" in preset else ["model.depth=2"])
        model = build_model(cfg)
        model.train()
        x = torch.randn(8, cfg.in_chans, cfg.img_size, cfg.img_size)
        measured = measure_saved_bytes(model, x)
        assert activation_bytes(cfg, 8, 4) == pytest.approx(measured, rel=0.03), preset


def test_instrument_ranges_cover_moe_parts_and_restore():
    from torch.profiler import ProfilerActivity, profile

    from bench.instrument import moe_ranges, range_times, top_ops_in

    cfg = common.model_config("widenet-digits", ["model.depth=2"])
    tr = common.PlainTrainer(cfg, 4, torch.device("cpu"), torch.float32)
    with moe_ranges(tr.model):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            tr.step()
    times = range_times(prof)
    assert set(times) == {"d00", "d01"}
    for d in times.values():
        for part in ("attn", "moe", "gate", "experts"):
            for phase in ("fwd", "bwd"):
                assert d.get(f"{part}/{phase}", 0) > 0, (part, phase)
        assert d.get("dispatch/fwd", 0) > 0  # the packed rows' bookkeeping
        # one process: no all-to-all, and the experts gather the tokens and sum the outputs back themselves
        assert "a2a/fwd" not in d and "combine/fwd" not in d
    assert top_ops_in(prof, "experts")
    assert "forward" not in tr.model.moe.__dict__ and "forward" not in tr.model.moe.gate.__dict__
    from deepspeed.moe import sharded_moe

    assert sharded_moe._AllToAll.__name__ == "_AllToAll"
    tr.step()  # still trains after the wrappers are gone


def test_dense_eq_has_widenet_activated_flops():
    from bench.moe_overhead import variant_spec

    preset, over = variant_spec("dense-eq", "cifar")
    dense = common.model_config(preset, over)
    wide = common.model_config("widenet-cifar")
    assert dense.mlp_dim == wide.moe.k * wide.moe.expert_dim and dense.moe is None
    fd, fw = step_flops(dense, 8)["train"], step_flops(wide, 8)["train"]
    assert fw > fd and (fw - fd) / fd < 0.01  # the router is the only difference


def test_moe_overhead_times_both_models_with_page_faults_and_system_time():
    from bench.moe_overhead import run_size

    res = run_size("digits", ["widenet", "dense-eq"], 4, 2, 1, "fp32", 0, torch.device("cpu"), log=lambda *a: None)
    assert res["baseline"] == "dense-eq"
    for v, r in res["variants"].items():
        assert r["minor_faults_per_step_median"] >= 0 and r["system_cpu_s_per_step_mean"] >= 0
        assert r["step_time_s"]["median"] > 0 and (r["paired_ratio_vs_dense-eq_median"] == 1.0) == (v == "dense-eq")


def test_moe_call_times_the_layer_and_its_parts_against_the_dense_ffn():
    from bench import moe_call

    fns = moe_call.build("digits", 2)
    assert set(fns) == {"moe", "dense", "gate", "experts", "mlp", "pack"}
    res = moe_call.run("digits", batch=2, rounds=2, warmup=1, threads=None, glibc_malloc_defaults=True)
    assert set(res["calls"]) == set(fns) and res["calls"]["dense"]["paired_vs_dense"] == 1.0
    assert all(c["median_ms"] > 0 and c["hot_median_ms"] > 0 for c in res["calls"].values())


def test_projection_widenet_does_more_all_to_all_than_vit_moe():
    from bench.scaling import GPUS, Layout, project

    hw = GPUS["h100"]
    for nodes, ep in ((1, 4), (4, 4), (4, 2)):
        lay = Layout(nodes=nodes, gpus_per_node=8, ep_size=ep, zero_stage=1, micro_batch=32)
        w = project(common.model_config("widenet-b"), lay, hw)
        v = project(common.model_config("vit-moe-b"), lay, hw)
        assert w["all_to_all"]["moe_calls_per_forward"] == 12 and v["all_to_all"]["moe_calls_per_forward"] == 2
        assert w["time_s"]["all_to_all"] > 5 * v["time_s"]["all_to_all"] > 0
        # same compute per attention; ViT-MoE's 78M non-expert parameters all-reduce more than WideNet's 4M
        assert v["time_s"]["allreduce"] >= w["time_s"]["allreduce"]
    one = project(common.model_config("widenet-b"), Layout(1, 8, 1, 1, 32), hw)
    assert one["time_s"]["all_to_all"] == 0.0


def test_projection_memory_follows_zero_stage():
    from bench.scaling import GPUS, Layout, project

    cfg = common.model_config("vit-moe-b")
    mems = [project(cfg, Layout(2, 8, 2, z, 16), GPUS["h100"])["memory_bytes"] for z in (0, 1, 2)]
    assert mems[0]["optimizer_state"] > mems[1]["optimizer_state"] == mems[2]["optimizer_state"]
    assert mems[0]["gradients"] == mems[1]["gradients"] > mems[2]["gradients"]


def test_advisor_ranks_and_refuses():
    from bench.scaling import GPUS, advise, main

    cfg = common.model_config("widenet-l")
    res = advise(cfg, nodes=4, gpus_per_node=8, hw=GPUS["h100"], global_batch=4096, ep_sizes=[1, 2, 3, 4],
                 micro_batches=[16, 64, 256], grad_ckpt=(False,))
    steps = [r["time_s"]["step"] for r in res["ranked"]]
    assert steps == sorted(steps) and len(steps) > 3
    assert {r["layout"]["ep_size"] for r in res["ranked"]} == {1, 2, 4}
    reasons = [r["reason"] for r in res["refused"]]
    assert any("ep_size 3 does not divide the 4 experts" in r for r in reasons)
    assert any("micro 256 x world 32" in r for r in reasons)
    # ep_size that divides the experts but not the world size (2 GPUs, ep 4)
    small = advise(cfg, nodes=1, gpus_per_node=2, hw=GPUS["h100"], global_batch=64, ep_sizes=[4])
    assert not small["ranked"] and all("does not divide the world size 2" in r["reason"] for r in small["refused"])
    # memory: a micro batch that cannot fit is refused, not ranked
    big = advise(common.model_config("widenet-h"), nodes=1, gpus_per_node=8, hw=GPUS["h100"], global_batch=2048,
                 ep_sizes=[1], micro_batches=[256], grad_ckpt=(False,))
    assert not big["ranked"] and "does not fit" in big["refused"][0]["reason"]
    # the CLI exits 2 when nothing is valid
    assert main(["advise", "--preset", "widenet-l", "--nodes", "4", "--ep-sizes", "3"]) == 2
    assert main(["advise", "--preset", "widenet-l", "--nodes", "1", "--top", "2"]) == 0


@pytest.mark.slow
def test_scaling_sweep_point_two_ranks(tmp_path):
    from bench.scaling import launch_point

    r = launch_point(2, 2, 1, "widenet-digits", 4, 2, 1, ["model.depth=2"], tmp_path / "p.json", profile=1, timeout=120)
    assert r["world"] == 2 and r["ep_size"] == 2 and r["zero_stage"] == 1 and r["images_per_s"] > 0
    assert len(r["ranks"]) == 2
    for rank in r["ranks"]:
        m = rank["memory"]
        assert m["params"] > 0 and m["optimizer_state"] > 0 and m["activations"] > 0 and m["grads"] > 0
        assert m["activations"] == pytest.approx(m["activations_estimate"], rel=0.1)
        prof = rank["profile"]
        assert prof["d00"]["a2a/fwd"] > 0 and prof["d01"]["a2a/bwd"] > 0
        # the process group's own records: the MoE's all-to-alls and ZeRO's gradient reductions
        assert rank["collectives"]["all_to_all"] > 0 and rank["collectives"]["all_reduce"] > 0


@pytest.mark.slow
def test_paper_table_trains_each_model_once_per_seed_resumes_and_tabulates(tmp_path):
    # 2 optimizer steps per run (the real recipes otherwise): the grid, the resume and the table
    out = tmp_path / "table"
    base = [sys.executable, "bench/paper_table.py"]
    grid = ["--data", "digits", "--archs", "widenet", "vit", "--seeds", "0"]
    res = subprocess.run([*base, "run", *grid, "--out", str(out), "--jobs", "2", "schedule.max_steps=2"],
                         cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "2 runs to do" in res.stdout
    for arch in ("widenet", "vit"):
        assert json.loads((out / "digits" / arch / "seed0" / "final.json").read_text())["step"] == 2
    again = subprocess.run([*base, "run", *grid, "--out", str(out), "schedule.max_steps=2"], cwd=ROOT, env=child_env(),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "0 runs to do" in again.stdout  # finished runs are not run again
    (out / "digits" / "vit" / "seed0" / "final.json").unlink()  # as if it had died after its checkpoint
    resumed = subprocess.run([*base, "run", *grid, "--out", str(out), "schedule.max_steps=2"], cwd=ROOT,
                             env=child_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "1 runs to do" in resumed.stdout, resumed.stderr[-2000:]
    assert "resumed from" in (out / "digits" / "vit" / "seed0.log").read_text()  # not started over
    other = subprocess.run([*base, "run", *grid, "--out", str(out), "schedule.max_steps=3"], cwd=ROOT,
                           env=child_env(), capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and "finished with other settings" in other.stderr  # never mixed into one table
    table = subprocess.run([*base, "table", *grid, "--out", str(out), "--json", str(tmp_path / "t.json")], cwd=ROOT,
                           env=child_env(), capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr[-2000:]
    rows = {r["arch"]: r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    assert rows["widenet"]["params"] == 337_546 and rows["vit"]["params"] > 2 * rows["widenet"]["params"]
    assert rows["widenet"]["test_images"] == 360 and len(rows["vit"]["top1"]) == 1
    assert "| digits (360) | widenet-digits | 0.34M |" in table.stdout
    bad = subprocess.run([*base, "run", "--data", "cifar10"], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and "invalid choice" in bad.stderr


def test_capacity_eval_sweeps_an_export_with_each_router(tmp_path):
    from ds_widenet.export import save_export
    from ds_widenet.models import build_model

    cfg = common.model_config("widenet-digits", ["model.depth=2", "model.embed_dim=16", "model.num_heads=2",
                                                 "model.moe.expert_dim=16"])
    model = build_model(cfg, seed=0)
    with torch.no_grad():  # random weights everywhere, so routing is uneven and capacity bites
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    export = save_export(model.state_dict(), cfg, tmp_path / "m.safetensors")
    out = tmp_path / "c.json"
    res = subprocess.run([sys.executable, "bench/capacity_eval.py", "--export", f"digits={export}", "--factors", "0.25",
                          "2.0", "--json", str(out), "--plot", str(tmp_path / "c.png")], cwd=ROOT, env=child_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {(r["capacity_factor"], r["router"]): r for r in json.loads(out.read_text())["results"]["digits"]["rows"]}
    # expert choice not at 2.0: k * 2.0 >= E, every expert would take every token
    assert set(rows) == {(cf, r) for cf in (0.25, 2.0) for r in ("paper", "bpr")} | {(0.25, "expert_choice")}
    assert all(r["images"] == 360 for r in rows.values())
    # at factor 2 with k 2 no expert can overflow: token order and priority order keep every route
    assert rows[(2.0, "paper")]["top1"] == rows[(2.0, "bpr")]["top1"] and rows[(2.0, "paper")]["drop_rate"] == 0.0
    assert rows[(0.25, "paper")]["drop_rate"] > 0.5 and rows[(0.25, "expert_choice")]["drop_rate"] > 0.0
    assert "| digits | 0.25 |" in res.stdout and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert "| digits | 2 | " in res.stdout and " | - | " in res.stdout
