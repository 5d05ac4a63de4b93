"""The DeepSpeed JSON keys the installed DeepSpeed reads, found by asking DeepSpeed's own parser.

DeepSpeed ignores a top-level key it does not read (a misspelled ``zero_optimisation`` trains with
ZeRO-0) and, in the sections it parses as plain dicts (``activation_checkpointing``,
``flops_profiler``, ``data_types``, ...), an inner key too. So the valid keys are read at run time
from the installed DeepSpeed rather than copied here:

* top level: the keys ``DeepSpeedConfig``'s parser (``_initialize_params`` and
  ``_do_warning_check``) looks up, recorded by running it on a dict that logs every lookup, plus
  the few ``deepspeed.initialize`` and ``DeepSpeedConfig.__init__`` read themselves (from their
  source: ``sequence_parallel_size``, ``data_parallel_size``, ``tensor_parallel``);
* a section DeepSpeed validates with a pydantic model (``zero_optimization``, ``bf16``, ``fp16``,
  the monitors, ``comms_logger``, ...): the model's field names and aliases, and those of the
  models nested in it. The model is the one DeepSpeed's parser reports when the section holds a
  probe key (pydantic names the model in its error);
* a section DeepSpeed reads as a plain dict: the keys its parser looks up in a logging dict given
  as that section.

A section read in any other way (copied, iterated, half dict and half model) is not checked inside.
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import typing
from dataclasses import dataclass
from typing import Any, Optional

from . import deepspeed_internals as dsi

_PROBE = "__ds_widenet_probe__"


@dataclass(frozen=True)
class Section:
    """The keys valid inside one section; `nested` holds the sub-sections that are models."""

    keys: frozenset[str]
    nested: "dict[str, Section]"
    parser: str  # how DeepSpeed reads it, for messages and tests: the model's name, or "dict"


@dataclass(frozen=True)
class Schema:
    version: str
    top_level: frozenset[str]
    sections: "dict[str, Section]"
    removed: "dict[str, str]"  # top-level key -> DeepSpeed's own message for a removed feature
    removed_in_section: "dict[str, dict[str, str]]"


class _Log:
    def __init__(self) -> None:
        self.lookups: list[Any] = []
        self.opaque = False  # iterated, copied or unpacked: read some other way than by key


class _Keys:
    """What a logging dict's keys() returns: `k in d.keys()` is a lookup, iterating is opaque."""

    def __init__(self, owner: "_LoggingDict") -> None:
        self._owner = owner

    def __contains__(self, k: Any) -> bool:
        self._owner._log.lookups.append(k)
        return dict.__contains__(self._owner, k)

    def __iter__(self):
        self._owner._log.opaque = True
        return dict.__iter__(self._owner)

    def __len__(self) -> int:
        self._owner._log.opaque = True
        return dict.__len__(self._owner)


class _LoggingDict(dict):
    """A dict that logs every key looked up in it (truthy even when empty, so that DeepSpeed's
    `if param_dict and KEY in param_dict.keys()` looks inside)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._log = _Log()

    def __bool__(self) -> bool:
        return True

    def get(self, k: Any, *default: Any) -> Any:
        self._log.lookups.append(k)
        return super().get(k, *default)

    def __getitem__(self, k: Any) -> Any:
        self._log.lookups.append(k)
        return super().__getitem__(k)

    def __contains__(self, k: Any) -> bool:
        self._log.lookups.append(k)
        return super().__contains__(k)

    def setdefault(self, k: Any, *default: Any) -> Any:
        self._log.lookups.append(k)
        return super().setdefault(k, *default)

    def pop(self, k: Any, *default: Any) -> Any:
        self._log.lookups.append(k)
        return super().pop(k, *default)

    def keys(self):  # type: ignore[override]
        return _Keys(self)

    def _opaque(self) -> None:
        self._log.opaque = True

    def __iter__(self):
        self._opaque()
        return super().__iter__()

    def items(self):  # type: ignore[override]
        self._opaque()
        return super().items()

    def values(self):  # type: ignore[override]
        self._opaque()
        return super().values()

    def copy(self) -> dict:  # type: ignore[override]
        self._opaque()
        return dict(self)

    def __reduce_ex__(self, protocol: Any) -> Any:  # copy.copy / deepcopy
        self._opaque()
        return dict(self).__reduce_ex__(protocol)


def _keys_read_in_source(fn: Any, names: tuple[str, ...] = ("config", "param_dict")) -> set[str]:
    """String keys `fn`'s source reads from a dict named in `names`: "k" in d, d["k"], d.get("k")."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    is_dict = lambda n: isinstance(n, ast.Name) and n.id in names  # noqa: E731
    is_str = lambda n: isinstance(n, ast.Constant) and isinstance(n.value, str)  # noqa: E731
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and is_str(node.left) and len(node.ops) == 1 \
                and isinstance(node.ops[0], ast.In) and is_dict(node.comparators[0]):
            found.add(node.left.value)
        elif isinstance(node, ast.Subscript) and is_dict(node.value) and is_str(node.slice):
            found.add(node.slice.value)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and is_dict(node.func.value) and node.args and is_str(node.args[0]):
            found.add(node.args[0].value)
    return found


def _model_classes() -> dict[str, list[type]]:
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    by_name: dict[str, list[type]] = {}
    todo = [DeepSpeedConfigModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            by_name.setdefault(sub.__name__, []).append(sub)
            todo.append(sub)
    return by_name


def _model_in(annotation: Any) -> Optional[type]:
    """The pydantic model a field holds (through Optional / Union), or None."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None


def _field_names(field_name: str, field: Any) -> set[str]:
    names = {field_name}
    for alias in (field.alias, field.validation_alias):
        if isinstance(alias, str):
            names.add(alias)
        elif alias is not None and hasattr(alias, "choices"):  # AliasChoices
            names.update(c for c in alias.choices if isinstance(c, str))
    return names


def _model_section(model: type, depth: int = 0) -> Section:
    keys: set[str] = set()
    nested: dict[str, Section] = {}
    for name, field in model.model_fields.items():
        names = _field_names(name, field)
        keys |= names
        sub = _model_in(field.annotation)
        if sub is not None and depth < 4:
            section = _model_section(sub, depth + 1)
            nested.update({n: section for n in names})
    return Section(frozenset(keys), nested, model.__name__)


def _probe_section(key: str, models: dict[str, list[type]]) -> Optional[Section]:
    """How DeepSpeed's parser reads section `key`: give it a logging dict holding a probe key."""
    import pydantic

    section = _LoggingDict({_PROBE: None})
    try:
        dsi.run_config_parser(_LoggingDict({key: section}))
    except pydantic.ValidationError as e:
        locs = [err["loc"] for err in e.errors() if err["type"] == "extra_forbidden" and err["loc"][-1:] == (_PROBE,)]
        candidates = models.get(e.title, [])
        if len(locs) != 1 or len(candidates) != 1:
            return None
        model: Optional[type] = candidates[0]
        for part in locs[0][:-1]:  # e.g. the monitors: DeepSpeedMonitorConfig -> tensorboard
            field = model.model_fields.get(part) if model is not None else None
            model = _model_in(field.annotation) if field is not None else None
        return _model_section(model) if model is not None else None
    except Exception:  # the parser cannot take a dict here (a scalar setting): nothing inside to check
        return None
    looked_up = {k for k in section._log.lookups if isinstance(k, str) and k != _PROBE}
    if section._log.opaque or not looked_up:
        return None
    return Section(frozenset(looked_up), {}, "dict")


@functools.lru_cache(maxsize=1)
def deepspeed_schema() -> Schema:
    """The installed DeepSpeed's config keys (see the module doc). Raises RuntimeError if this
    DeepSpeed's parser cannot be read this way (the probe needs updating for it)."""
    import logging

    import deepspeed
    from deepspeed.runtime import config as ds_config
    from deepspeed.utils import logger as ds_logger

    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)  # the probes' deprecation warnings are not the user's
    try:
        top = _LoggingDict()
        dsi.run_config_parser(top)
        top_level = {k for k in top._log.lookups if isinstance(k, str)}
        top_level |= _keys_read_in_source(deepspeed.initialize)
        top_level |= _keys_read_in_source(ds_config.DeepSpeedConfig.__init__)
        models = _model_classes()
        sections = {k: s for k in sorted(top_level) if (s := _probe_section(k, models)) is not None}
    except Exception as e:
        raise RuntimeError(f"cannot read the config schema of deepspeed {deepspeed.__version__} "
                           f"({type(e).__name__}: {e}): ds_widenet/ds_schema.py needs updating for it") from e
    finally:
        ds_logger.setLevel(level)
    removed, removed_zero = dsi.removed_config_keys()
    return Schema(deepspeed.__version__, frozenset(top_level - set(removed)), sections, removed,
                  {"zero_optimization": removed_zero} if removed_zero else {})
