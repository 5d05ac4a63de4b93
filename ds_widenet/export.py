"""`python -m ds_widenet.export <ckpt_dir> [--tag T] --out model.safetensors [--force]`

Writes one safetensors file (fp32 master weights, every expert under its global id) and
`model.json` beside it from a ds-widenet checkpoint. `ckpt_dir` is a run's `checkpoints/` folder
(newest complete checkpoint, or `--tag stepN`) or one checkpoint. Load the result with
`ds_widenet.export.load_exported` (plain PyTorch: no DeepSpeed, no torch.distributed, no pickle).

Format "ds-widenet-export-v2" (older "v1" exports, in DeepSpeed's module names, still load):

* weight names a reader understands, none containing "deepspeed" (see `clean_name`):
  WideNet `patch_embed.proj.*`, `pos_embed`, [`cls_token`], `attn.qkv.*`, `attn.proj.*`,
  `attn_norms.{i}.*`, `moe_norms.{i}.*`, `moe.gate.weight` ([E, d]; [depth*E, d] with
  per_depth_gate, depth i's gate in rows i*E..(i+1)*E), `moe.experts.{e}.fc1.*` / `.fc2.*`,
  `norm.*`, [`pre_logits.fc.*`], `head.*`; ViT / ViT-MoE follow timm's vision_transformer:
  `blocks.{j}.norm1.*`, `blocks.{j}.attn.qkv.*`, `blocks.{j}.attn.proj.*`, `blocks.{j}.norm2.*`,
  `blocks.{j}.mlp.fc1.*` / `.fc2.*` (dense blocks), `blocks.{j}.mlp.gate.weight` and
  `blocks.{j}.mlp.experts.{e}.fc1.*` (MoE blocks);
* the JSON holds `format`, `step`, `model` (the ModelConfig), and when the checkpoint's recipe
  tells them `preprocess` (`data`, `mean`, `std`, `resize`: "square" or "center_crop" with
  `crop_ratio`: the evaluation transform of data.py) and `class_names`; for arch "vit" also
  `timm`: {"kwargs": {...}} for `timm.models.vision_transformer.VisionTransformer(**kwargs)`,
  which then loads the weights with strict=True (kwargs null and a `reason` where timm has no
  equivalent, e.g. pre_logits).

The trainer's `--init_from` reads an export with `read_export` (clean names), adapts it with
`adapt_for_finetune` and maps it back with `to_deepspeed_names` for the DeepSpeed model.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, TypeVar, Union

import torch

from .config import ConfigError, ModelConfig, model_config_from_dict

if TYPE_CHECKING:
    from .standalone import StandaloneModel

EXPORT_FORMAT = "ds-widenet-export-v2"
EXPORT_FORMAT_V1 = "ds-widenet-export-v1"  # DeepSpeed module names; read and mapped on load
KNOWN_FORMATS = (EXPORT_FORMAT_V1, EXPORT_FORMAT)

T = TypeVar("T")

# --------------------------------------------------------------------------------------------
# Weight names: DeepSpeed module names <-> clean names. Each rule rewrites a prefix; the two
# lists are inverses of each other, and each side's names never match the other side's patterns,
# so both mappings are idempotent (a v2 name passes `clean_name` unchanged, and vice versa).

# (DeepSpeed prefix, clean prefix); {j} is a block index. Both directions are built from this one table.
_PREFIXES = [
    ("moe.moe.deepspeed_moe.gate.wg.", "moe.gate."),
    ("moe.moe.deepspeed_moe.experts.deepspeed_experts.", "moe.experts."),
    ("blocks.{j}.ffn.moe.deepspeed_moe.gate.wg.", "blocks.{j}.mlp.gate."),
    ("blocks.{j}.ffn.moe.deepspeed_moe.experts.deepspeed_experts.", "blocks.{j}.mlp.experts."),
    ("blocks.{j}.ffn.mlp.", "blocks.{j}.mlp."),
    ("pre_logits.0.", "pre_logits.fc."),
]


def _prefix_rule(src: str, dst: str) -> tuple[re.Pattern[str], str]:
    pattern = "^" + re.escape(src).replace(re.escape("{j}"), r"(\d+)")
    return re.compile(pattern), dst.replace("{j}", r"\1")


_DS_TO_CLEAN_RE = [_prefix_rule(ds, clean) for ds, clean in _PREFIXES]
_CLEAN_TO_DS_RE = [_prefix_rule(clean, ds) for ds, clean in _PREFIXES]


def _rename(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, repl in rules:
        new, n = pattern.subn(repl, name, count=1)
        if n:
            return new
    return name


def clean_name(name: str) -> str:
    """A DeepSpeed model's parameter name (ep_size 1, global expert ids) -> its export name;
    an export name is returned unchanged."""
    return _rename(name, _DS_TO_CLEAN_RE)


def deepspeed_name(name: str) -> str:
    """An export name -> the DeepSpeed model's parameter name (ep_size 1, global expert ids);
    a DeepSpeed name is returned unchanged."""
    return _rename(name, _CLEAN_TO_DS_RE)


def to_clean_names(weights: Mapping[str, T]) -> dict[str, T]:
    """Rename a state dict in DeepSpeed names (or a v1 export) to export names."""
    out = {clean_name(k): v for k, v in weights.items()}
    left = next((k for k in out if "deepspeed" in k), None)
    if left is not None:
        raise ConfigError(f"weight {left} has no export name: the DeepSpeed MoE layout is not one this version knows")
    return out


def expected_weights(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Export name -> shape of every weight of a model of `cfg` (nothing is allocated)."""
    from .standalone import build

    return {k: tuple(v.shape) for k, v in build(cfg, device="meta").state_dict().items()}


def to_deepspeed_names(weights: Mapping[str, T], cfg: ModelConfig) -> dict[str, T]:
    """Rename export weights (v2 clean names, or v1 DeepSpeed names) to the parameter names of a
    DeepSpeed model of `cfg` (ep_size 1 naming: experts under global ids; reshard.load_weights_into
    places them on any ep_size). A subset is fine (e.g. without the head after adapt_for_finetune);
    a weight such a model does not have is a ConfigError naming it."""
    known = {deepspeed_name(k) for k in expected_weights(cfg)}
    out: dict[str, T] = {}
    for k, v in weights.items():
        ds = deepspeed_name(k)
        if ds not in known:
            raise ConfigError(f"weight {k} is not part of a {cfg.arch} model of depth {cfg.depth}"
                              f"{'' if cfg.moe is None else f' with {cfg.moe.num_experts} experts'}: "
                              "use an export of the same architecture")
        out[ds] = v
    return out


def _check_weights(weights: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str, fix: str,
                   extra_ok: bool = False) -> None:
    """One-line ConfigError unless `weights` (export names) are exactly those of a `cfg` model."""
    expected = expected_weights(cfg)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ConfigError(f"{source} lacks {len(missing)} weight(s) of its model config (e.g. {missing[0]}): {fix}")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected and not extra_ok:
        raise ConfigError(f"{source} has {len(unexpected)} weight(s) its model config does not know "
                          f"(e.g. {unexpected[0]}): {fix}")
    for k, shape in expected.items():
        if tuple(weights[k].shape) != shape:
            raise ConfigError(f"weight {k} in {source} has shape {tuple(weights[k].shape)} but the model config "
                              f"says {shape}: {fix}")


# --------------------------------------------------------------------------------------------
# What a reader needs besides the weights: preprocessing, class names, timm's arguments

_CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def preprocess_spec(data_name: Optional[str], cfg: ModelConfig) -> Optional[dict[str, Any]]:
    """The evaluation transform data.py applies for `data_name`, as data: {"data", "mean", "std",
    "resize": "square" | "center_crop", "crop_ratio"} (None for synthetic or unknown data).
    Inputs are pixels scaled to [0, 1] (digits: the 0..16 arrays / 16, ink bright on dark)."""
    from . import data as d

    if data_name == "digits":
        x_train = d.load_digits_split()[0]
        mean, std = [float(x_train.mean())], [float(x_train.std())]  # as data._digits computes them
        return {"data": "digits", "mean": mean, "std": std, "resize": "square"}
    if data_name in d._CIFAR:
        mean, std = d._CIFAR[data_name][3:5]
        return {"data": data_name, "mean": list(mean), "std": list(std), "resize": "square"}
    if data_name == "imagefolder":
        return {"data": "imagefolder", "mean": list(d._IMAGENET_MEAN), "std": list(d._IMAGENET_STD),
                "resize": "center_crop", "crop_ratio": d._EVAL_CROP}
    return None


def class_names_for(data: Mapping[str, Any], num_classes: int) -> Optional[list[str]]:
    """Class names of a recipe's data section, where they can be known (None otherwise): digits
    0..9, CIFAR-10's, CIFAR-100's (read from data.root), an image folder's (sorted class folders
    of root/train, ImageFolder's numbering)."""
    name, root = data.get("name"), data.get("root")
    names: Optional[list[str]] = None
    try:
        if name == "digits":
            names = [str(i) for i in range(10)]
        elif name == "cifar10":
            names = list(_CIFAR10_CLASSES)
        elif name == "cifar100" and root:
            from torchvision import datasets

            names = list(datasets.CIFAR100(root, train=False, download=False).classes)
        elif name == "imagefolder" and root:
            from torchvision.datasets.folder import find_classes

            names = find_classes(Path(root) / "train")[0]
    except (OSError, RuntimeError):  # the data is not on this machine: no names, not an error
        return None
    return names if names is not None and len(names) == num_classes else None


def timm_kwargs(cfg: ModelConfig) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """(kwargs for timm's VisionTransformer that loads this dense ViT's export with strict=True and
    computes the same logits, None) or (None, why not). Avg pooling takes fc_norm=False so timm
    applies `norm` before pooling, as ds-widenet does; LayerNorm eps is 1e-6 in both."""
    if cfg.arch != "vit":
        return None, f"arch {cfg.arch} has MoE layers, which timm's VisionTransformer does not have"
    if cfg.pre_logits:
        return None, "pre_logits (Linear + tanh before the head) has no equivalent in timm's VisionTransformer"
    ratio = cfg.mlp_dim / cfg.embed_dim
    if int(cfg.embed_dim * ratio) != cfg.mlp_dim:  # timm sizes its Mlp as int(embed_dim * mlp_ratio)
        return None, f"mlp_dim {cfg.mlp_dim} is not int(embed_dim * ratio) for a float ratio"
    cls = cfg.pool == "cls"
    return {"img_size": cfg.img_size, "patch_size": cfg.patch_size, "in_chans": cfg.in_chans,
            "num_classes": cfg.num_classes, "embed_dim": cfg.embed_dim, "depth": cfg.depth,
            "num_heads": cfg.num_heads, "mlp_ratio": ratio, "qkv_bias": cfg.qkv_bias, "class_token": cls,
            "global_pool": "token" if cls else "avg", "fc_norm": False, "no_embed_class": False}, None


# --------------------------------------------------------------------------------------------
# Writing


def save_export(weights: Mapping[str, torch.Tensor], cfg: ModelConfig, out_file: Union[str, Path], step: int = 0,
                data: Optional[Mapping[str, Any]] = None, force: bool = False) -> Path:
    """Write `out_file` (.safetensors, export names) and its .json from a full state dict in
    DeepSpeed or export names. `data` is the recipe's data section (for preprocess / class_names)."""
    from safetensors.torch import save_file

    out_file = Path(out_file)
    cfg_file = out_file.with_suffix(".json")
    if not force and (out_file.exists() or cfg_file.exists()):
        raise ConfigError(f"{out_file} (or its .json) exists: choose another --out or pass --force to overwrite")
    clean = to_clean_names(weights)
    _check_weights(clean, cfg, "the weights", "they are of another model", extra_ok=True)
    info: dict[str, Any] = {"format": EXPORT_FORMAT, "step": int(step), "model": cfg.to_dict()}
    if data:
        spec = preprocess_spec(data.get("name"), cfg)
        if spec is not None:
            info["preprocess"] = spec
        names = class_names_for(data, cfg.num_classes)
        if names is not None:
            info["class_names"] = names
    if cfg.arch == "vit":
        kwargs, reason = timm_kwargs(cfg)
        info["timm"] = {"kwargs": kwargs} if kwargs is not None else {"kwargs": None, "reason": reason}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    expected = expected_weights(cfg)
    save_file({k: clean[k].detach().float().cpu().contiguous() for k in expected}, str(tmp),
              metadata={"format": EXPORT_FORMAT, "step": str(int(step))})
    cfg_file.write_text(json.dumps(info, indent=2))
    os.replace(tmp, out_file)  # the target appears only once it is whole
    return out_file


def resolve_checkpoint(path: Path, tag: Optional[str]) -> Path:
    """The checkpoint `python -m ds_widenet.export` reads: `path/tag`, `path` itself when it is
    one checkpoint, else the newest complete one under `path`."""
    from .checkpoint import COMPLETE, complete_checkpoints

    if tag:
        d = path / tag
        if not d.is_dir():
            have = ", ".join(p.name for p in complete_checkpoints(path)) or "none"
            raise ConfigError(f"no checkpoint {tag!r} under {path} (complete ones: {have}): pass an existing --tag")
        return d
    if (path / COMPLETE).exists() or (path / "meta.json").exists():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise ConfigError(f"no complete checkpoint under {path}: pass a run's checkpoints/ folder or one step<N> folder")
    return found[-1]


def export(ckpt: Path, out_file: Path, force: bool = False) -> Path:
    """One safetensors file + `<out>.json` from a checkpoint's layout-free weight shards."""
    from .checkpoint import COMPLETE, read_meta
    from .reshard import read_shards

    out_file = Path(out_file)
    if not force and (out_file.exists() or out_file.with_suffix(".json").exists()):
        raise ConfigError(f"{out_file} (or its .json) exists: choose another --out or pass --force to overwrite")
    if not (ckpt / COMPLETE).exists():
        raise ConfigError(f"checkpoint {ckpt} is incomplete (no '{COMPLETE}' marker): export an earlier one")
    meta = read_meta(ckpt)
    cfg = _config_from_export(meta["model"])
    weights, _ = read_shards(ckpt, "weights")
    _check_weights(to_clean_names(weights), cfg, f"checkpoint {ckpt}",
                   "a rank's shard is missing, or meta.json is of another model", extra_ok=True)
    data = (meta.get("recipe") or {}).get("data")
    return save_export(weights, cfg, out_file, step=meta["step"], data=data, force=True)


# --------------------------------------------------------------------------------------------
# Reading


def _config_from_export(model: Mapping[str, Any]) -> ModelConfig:
    # An export's model entry is a full ModelConfig: `preset` only records where it started.
    # Building it without the preset keeps model_config_from_dict from importing the DeepSpeed
    # models package (where the presets live), so exports load where DeepSpeed is not installed.
    d = dict(model)
    preset = d.pop("preset", None)
    cfg = model_config_from_dict(d)
    cfg.preset = preset
    return cfg


def read_export_info(path: Union[str, Path]) -> dict[str, Any]:
    """The JSON beside an export (format checked, `model` present); one-line ConfigErrors."""
    path = Path(path)
    cfg_file = path.with_suffix(".json")
    if not cfg_file.is_file():
        raise ConfigError(f"{cfg_file} is missing: an export is {path.name} plus {cfg_file.name} "
                          "(python -m ds_widenet.export writes both)")
    try:
        info = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cfg_file} is corrupt ({type(e).__name__}): re-export, or restore it from the export") from None
    if not isinstance(info, dict) or not isinstance(info.get("model"), dict):
        raise ConfigError(f"{cfg_file} is not an export config (no 'model' entry): re-export with python -m ds_widenet.export")
    fmt = info.get("format", EXPORT_FORMAT_V1)
    if fmt not in KNOWN_FORMATS:
        raise ConfigError(f"{cfg_file} has format {fmt!r}; this ds-widenet reads {', '.join(KNOWN_FORMATS)}: "
                          "upgrade ds-widenet")
    return info


def _merge_overrides(model: dict[str, Any], overrides: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    if not overrides:
        return model
    merged = {**model, **{k: v for k, v in overrides.items() if k != "moe"}}
    if "moe" in overrides and merged.get("moe"):
        merged["moe"] = {**merged["moe"], **overrides["moe"]}
    return merged


def read_export(path: Union[str, Path], overrides: Optional[Mapping[str, Any]] = None
                ) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(weights in export names, their ModelConfig) of an export, v1 or v2, checked to match each
    other exactly. `overrides` change config fields that do not change the weights (e.g.
    {"moe": {"eval_capacity_factor": 4.0}}). Every failure is a one-line ConfigError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: pass the .safetensors file python -m ds_widenet.export wrote")
    info = read_export_info(path)
    cfg_file = path.with_suffix(".json")
    try:
        cfg = _config_from_export(_merge_overrides(info["model"], overrides))
    except ConfigError as e:
        raise ConfigError(f"{cfg_file}: {e}") from None
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{path} is truncated or corrupt ({str(e).splitlines()[0][:80]}): re-export it") from None
    weights = to_clean_names(raw)  # v1 files hold DeepSpeed names; v2 names pass unchanged
    _check_weights(weights, cfg, str(path), f"it does not match {cfg_file.name}: keep each export with its own .json")
    return weights, cfg


def load_exported(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                  overrides: Optional[Mapping[str, Any]] = None) -> "StandaloneModel":
    """The export as a `standalone.StandaloneModel` in eval mode on `device` (plain PyTorch: no
    DeepSpeed, no torch.distributed), weights loaded strictly. `overrides`: see read_export."""
    from .standalone import build

    weights, cfg = read_export(path, overrides)
    model = build(cfg, device="meta")
    model.load_state_dict(weights, strict=True, assign=True)  # the loaded tensors become the parameters
    return model.to(device).eval()


def adapt_for_finetune(weights: dict[str, torch.Tensor], src: ModelConfig, dst: ModelConfig) -> dict[str, torch.Tensor]:
    """Fine-tuning from an export: drop the head when the class count changes (it is re-initialised)
    and interpolate position embeddings (bicubic, as timm) when the patch grid changes. The keys
    it touches (`head.*`, `pos_embed`) are the same in export and DeepSpeed names."""
    import torch.nn.functional as F

    out = dict(weights)
    if src.num_classes != dst.num_classes:
        out.pop("head.weight", None)
        out.pop("head.bias", None)
    pe = out.get("pos_embed")
    if pe is not None:
        prefix = 1 if src.pool == "cls" else 0
        old = int(round((pe.shape[1] - prefix) ** 0.5))
        new = dst.img_size // dst.patch_size
        if old != new:
            grid = pe[:, prefix:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
            out["pos_embed"] = torch.cat([pe[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds_widenet.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt_dir", type=Path)
    ap.add_argument("--tag", default=None, help="checkpoint tag (stepN); default: the newest complete one")
    ap.add_argument("--out", type=Path, required=True, help="output .safetensors file (its .json goes beside it)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = ap.parse_args(argv)
    try:
        if args.out.suffix != ".safetensors":
            raise ConfigError(f"--out {args.out} must end in .safetensors")
        ckpt = resolve_checkpoint(args.ckpt_dir, args.tag)
        out = export(ckpt, args.out, force=args.force)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {ckpt} -> {out} (+ {out.with_suffix('.json').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
