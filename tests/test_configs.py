"""The shipped recipes and DeepSpeed configs in ds_configs/: they load, they pair as documented in
ds_configs/README.md, and the ImageNet ones carry the paper's recipe. Fast: no model is built."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ds_widenet.config import BatchLayout, ConfigError, load_ds_config, load_recipe, validate

CONFIGS = Path(__file__).resolve().parent.parent / "ds_configs"
YAMLS = sorted(CONFIGS.glob("*.yaml"))
JSONS = sorted(CONFIGS.glob("*.json"))

IMAGENET_WORLD = 32  # 4 nodes x 8 GPUs: a multiple of ep_size 4, and divides 4096 / micro for every JSON
CIFAR_WORLD = 8

# ImageNet recipe -> (preset, size-class of its GPU JSON, ZeRO>0 JSON, paper top-1)
IMAGENET = {
    "imagenet_vit_b.yaml": ("vit-b", "b", "gpu_bf16_zero1_b.json", "78.6"),
    "imagenet_vit_l.yaml": ("vit-l", "l", "gpu_bf16_zero1_l.json", "77.5"),
    "imagenet_vit_moe_b.yaml": ("vit-moe-b", "b", "gpu_bf16_zero1_b.json", "77.9"),
    "imagenet_vit_moe_l.yaml": ("vit-moe-l", "l", "gpu_bf16_zero1_l.json", "77.4"),
    "imagenet_widenet_b.yaml": ("widenet-b", "b", "gpu_bf16_zero1_b.json", "77.5"),
    "imagenet_widenet_l.yaml": ("widenet-l", "l", "gpu_bf16_zero1_l.json", "79.5"),
    "imagenet_widenet_h.yaml": ("widenet-h", "h", "gpu_bf16_zero2_h.json", "80.1"),
}
MICRO = {"b": 128, "l": 64, "h": 64}
IMAGENET_JSONS = [f"gpu_bf16_zero{z}_{s}.json" for z, s in (("0", "b"), ("0", "l"), ("0", "h"), ("1", "b"), ("1", "l"), ("2", "h"))]

# (recipe, JSON, world, overrides, expected (micro, grad_accum)): pairs documented to pass validate() today.
VALID_PAIRS = [
    ("digits_widenet.yaml", "cpu_fp32.json", 1, [], (32, 2)),
    ("digits_vit.yaml", "cpu_fp32.json", 1, [], (32, 2)),
    ("digits_vit_moe.yaml", "cpu_fp32.json", 1, [], (32, 2)),
    ("digits_widenet.yaml", "cpu_fp32_zero1.json", 2, ["parallel.ep_size=2"], (32, 1)),
    ("digits_vit_moe.yaml", "cpu_fp32_zero1.json", 2, ["parallel.ep_size=2"], (32, 1)),
    ("digits_vit.yaml", "cpu_fp32_zero1.json", 2, [], (32, 1)),
    ("mnist5k_widenet.yaml", "cpu_fp32.json", 1, [], (32, 2)),
    ("mnist5k_vit.yaml", "cpu_fp32.json", 1, [], (32, 2)),
    ("mnist5k_vit_moe.yaml", "cpu_fp32.json", 1, [], (32, 2)),
]
for _name in ("cifar10_widenet.yaml", "cifar10_vit.yaml", "cifar10_vit_moe.yaml"):
    VALID_PAIRS += [(_name, "gpu_bf16_cifar.json", CIFAR_WORLD, [], (64, 1)),
                    (_name, "gpu_bf16_cifar.json", 1, [], (64, 8))]
for _name, (_preset, _size, _zero_json, _) in IMAGENET.items():
    _ep1 = [] if _preset.startswith("vit-") and "moe" not in _preset else ["parallel.ep_size=1"]
    _ga = 4096 // (MICRO[_size] * IMAGENET_WORLD)
    # Workaround 1 (README): the paper's LAMB on ZeRO 0, experts not split (DeepSpeed #8475).
    VALID_PAIRS.append((_name, f"gpu_bf16_zero0_{_size}.json", IMAGENET_WORLD, _ep1, (MICRO[_size], _ga)))
    # Workaround 2 (README): AdamW keeps ZeRO 1/2 and ep_size 4.
    VALID_PAIRS.append((_name, _zero_json, IMAGENET_WORLD, ["optim.name=adamw", "optim.lr=0.003"], (MICRO[_size], _ga)))

# The paper's LAMB with ZeRO 1/2: refused until the ZeRO-aware LAMB (issue 3) lands.
LAMB_ZERO_PAIRS = [(name, zero_json) for name, (_, _, zero_json, _) in IMAGENET.items()]


def _ids(pairs):
    return [f"{p[0]}+{p[1]}@{p[2]}" + ("+" + ",".join(p[3]) if p[3] else "") for p in pairs]


def test_expected_files_exist():
    names = {p.name for p in CONFIGS.iterdir()}
    expected = set(IMAGENET) | set(IMAGENET_JSONS) | {
        "cifar10_widenet.yaml", "cifar10_vit.yaml", "cifar10_vit_moe.yaml", "gpu_bf16_cifar.json",
        "digits_widenet.yaml", "digits_vit.yaml", "digits_vit_moe.yaml", "cpu_fp32.json", "cpu_fp32_zero1.json",
        "README.md"}
    assert expected <= names, f"missing from ds_configs/: {sorted(expected - names)}"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_recipe_loads_and_starts_with_a_comment(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name} must start with a comment saying what it is for"
    recipe = load_recipe(path)
    assert recipe.description, f"{path.name} has no description"
    assert recipe.model.preset, f"{path.name} should start from a named preset"


@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.name)
def test_ds_config_loads_and_owns_no_optimizer_or_scheduler(path):
    ds = load_ds_config(path)
    for section in ("optimizer", "scheduler", "moe"):
        assert section not in ds, f"{path.name} has a '{section}' section: the recipe owns it"
    assert "train_batch_size" in ds and "train_micro_batch_size_per_gpu" in ds
    assert ds.get("gradient_clipping") == 1.0


@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.name)
def test_every_shipped_ds_config_uses_only_keys_the_installed_deepspeed_reads(path):
    import json

    from ds_widenet.config import check_deepspeed_keys

    check_deepspeed_keys(json.loads(path.read_text()), str(path))  # raises ConfigError naming the key

def test_every_file_is_documented_in_the_readme():
    readme = (CONFIGS / "README.md").read_text()
    for path in YAMLS + JSONS:
        assert f"`{path.name}`" in readme, f"ds_configs/README.md does not document {path.name}"


@pytest.mark.parametrize("name", IMAGENET_JSONS)
def test_imagenet_ds_configs(name):
    ds = load_ds_config(CONFIGS / name)
    size = name.rsplit("_", 1)[1].removesuffix(".json")
    stage = int(name.split("_zero")[1][0])
    assert ds["train_batch_size"] == 4096
    assert ds["train_micro_batch_size_per_gpu"] == MICRO[size]
    assert ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["tensorboard"]["enabled"] is True
    assert not (ds.get("fp16") or {}).get("enabled", False)


def test_cifar_ds_config():
    ds = load_ds_config(CONFIGS / "gpu_bf16_cifar.json")
    assert ds["train_batch_size"] == 512 and ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["stage"] == 0  # so the LAMB recipes are valid with it today


@pytest.mark.parametrize("name", sorted(IMAGENET))
def test_imagenet_recipe_is_the_papers(name):
    preset, _, _, top1 = IMAGENET[name]
    path = CONFIGS / name
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert f"{top1}%" in header, f"{name}: the header should state the paper's top-1 ({top1}%)"
    r = load_recipe(path)
    assert r.model.preset == preset and r.model.img_size == 224 and r.model.num_classes == 1000
    assert r.model.dropout == 0.1
    assert (r.data.name, r.data.root, r.data.augment) == ("imagefolder", "/data/imagenet", "imagenet")
    assert (r.data.randaug_ops, r.data.randaug_magnitude, r.data.crop_min_area, r.data.num_workers) == (2, 15, 0.05, 8)
    assert (r.optim.name, r.optim.lr, r.optim.weight_decay, r.optim.betas) == ("lamb", 0.01, 0.1, (0.9, 0.999))
    assert (r.schedule.epochs, r.schedule.warmup_epochs, r.schedule.decay) == (300, 30, "linear")
    assert (r.train.label_smoothing, r.train.mixup_alpha) == (0.1, 0.5)
    if r.model.arch == "vit":
        assert r.model.moe is None and r.parallel.ep_size == 1
    else:
        m = r.model.moe
        assert (m.router, m.num_experts, m.k, m.capacity_factor, m.eval_capacity_factor, m.aux_loss_weight) == (
            "paper", 4, 2, 1.2, 2.0, 0.01)
        assert r.parallel.ep_size == 4


@pytest.mark.parametrize("name", ["cifar10_widenet.yaml", "cifar10_vit.yaml", "cifar10_vit_moe.yaml"])
def test_cifar_recipe_is_the_papers_cifar_column(name):
    r = load_recipe(CONFIGS / name)
    assert r.model.preset == name.removeprefix("cifar10_").removesuffix(".yaml").replace("_", "-") + "-cifar"
    assert (r.data.name, r.data.root, r.data.augment) == ("cifar10", "/data/cifar10", "cifar")
    assert (r.optim.name, r.optim.lr, r.optim.weight_decay) == ("lamb", 0.03, 0.0)
    assert (r.schedule.epochs, r.schedule.warmup_epochs, r.schedule.decay) == (100, 0, "linear")
    assert (r.model.dropout, r.train.label_smoothing, r.train.mixup_alpha) == (0.1, 0.0, 0.5)


@pytest.mark.parametrize("name", ["digits_vit.yaml", "digits_vit_moe.yaml", "mnist5k_vit.yaml", "mnist5k_vit_moe.yaml"])
def test_baselines_mirror_their_widenet_recipe(name):
    """Everything but the model preset (and, for the dense ViT, the MoE section) is copied from the
    data set's WideNet recipe (the paper table's matched budget): after re-tuning that file, copy the
    change into the baselines."""
    data = name.split("_", 1)[0]
    base_name = f"{data}_widenet.yaml"
    base = yaml.safe_load((CONFIGS / base_name).read_text())
    other = yaml.safe_load((CONFIGS / name).read_text())
    for key in sorted(set(base) | set(other)):
        if key == "description":
            continue
        if key == "model":
            b = {k: v for k, v in base["model"].items() if k != "preset"}
            o = {k: v for k, v in other["model"].items() if k != "preset"}
            if name.endswith("_vit.yaml"):
                b.pop("moe", None)
            assert o == b, f"{name}: model (except preset) differs from {base_name}; copy the change"
        else:
            assert other.get(key) == base.get(key), f"{name}: '{key}' differs from {base_name}; copy the change"


@pytest.mark.parametrize("recipe_name,json_name,world,overrides,layout", VALID_PAIRS, ids=_ids(VALID_PAIRS))
def test_documented_pair_validates(recipe_name, json_name, world, overrides, layout):
    recipe = load_recipe(CONFIGS / recipe_name, overrides)
    got = validate(recipe, load_ds_config(CONFIGS / json_name), world)
    assert got == BatchLayout(micro=layout[0], grad_accum=layout[1], world=world)


@pytest.mark.parametrize("recipe_name,json_name", LAMB_ZERO_PAIRS, ids=[f"{a}+{b}" for a, b in LAMB_ZERO_PAIRS])
def test_the_papers_lamb_runs_with_zero_1_and_2(recipe_name, json_name):
    """The paper's LAMB + ZeRO 1/2 pairs validate: the project's LAMB keeps its trust ratio per
    parameter under ZeRO partitions (optim.Lamb.attach_zero_partitions)."""
    recipe = load_recipe(CONFIGS / recipe_name)
    ds = load_ds_config(CONFIGS / json_name)
    assert recipe.optim.name == "lamb" and ds["zero_optimization"]["stage"] in (1, 2)
    validate(recipe, ds, IMAGENET_WORLD)


def test_moe_imagenet_recipes_need_a_multiple_of_ep_size():
    recipe = load_recipe(CONFIGS / "imagenet_widenet_l.yaml", ["optim.name=adamw"])
    with pytest.raises(ConfigError, match="ep_size"):
        validate(recipe, load_ds_config(CONFIGS / "gpu_bf16_zero1_l.json"), 6)
