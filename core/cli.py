"""The command line of every config-driven command: `--help` listing the config's fields, `--print-config`.

    CMD CONFIG [key.sub=value ...] [--print-config]

`--help` lists every field of the pydantic config (nested sections flattened as `rollout.sample.top_k`, list
items as `rewards.rewards[].name`) with its type, default and description (`Field(description=...)`).
Torch-free: a command parses its arguments before importing anything heavy.
"""
from __future__ import annotations

import enum
import sys
import types
import typing
from dataclasses import dataclass
from typing import Callable, TypeVar

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined, to_jsonable_python

from core.config import ConfigError, load_config

T = TypeVar("T", bound=BaseModel)
HELP, PRINT = ("-h", "--help"), "--print-config"


# ----------------------------------------------------------------------------------------------- field table
def type_name(tp) -> str:
    """A short readable name of an annotation: `int | list[int]`, `offline|online|disabled`, `dict`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple, dict, set):
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args and origin is not dict else origin.__name__
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "|".join(str(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def models_in(tp) -> tuple[type[BaseModel] | None, bool]:
    """(the config section an annotation holds, whether as list items): `X`, `X | None` -> X; `list[X]` -> X."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp, False
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        found = [m for m in (models_in(a) for a in args) if m[0] is not None]
        return found[0] if len(found) == 1 else (None, False)
    if origin is list and len(args) == 1:
        inner, _ = models_in(args[0])
        return inner, inner is not None
    return None, False


def default_text(value, limit: int = 18) -> str:
    """A default as the YAML one would write (`offline`, `[0.9, 0.95]`, `null`), cut at `limit` characters."""
    if value is PydanticUndefined:
        return "required"
    text = yaml.safe_dump(to_jsonable_python(value), default_flow_style=True, width=10**6)
    text = text.strip().removesuffix("...").strip()  # a scalar document ends with "..."
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class Row:
    name: str
    type: str
    default: str
    description: str


def field_rows(cls: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None) -> list[Row]:
    """Every field of `cls`, sections flattened. `defaults`: the instance a parent's default holds (its values win
    over the class defaults, e.g. rollout.sample's top_k=32)."""
    rows = []
    for name, info in cls.model_fields.items():
        if defaults is not None:
            value = getattr(defaults, name)
        else:
            value = info.get_default(call_default_factory=True)
        section, as_list = models_in(info.annotation)
        kind, shown = type_name(info.annotation), default_text(value)
        if section is not None and not as_list:
            kind, shown = kind.replace(section.__name__, "section"), "" if value is not None else shown
        rows.append(Row(prefix + name, kind, shown, info.description or ""))
        if section is not None:
            sub_defaults = value if isinstance(value, section) else None
            rows += field_rows(section, f"{prefix}{name}{'[]' if as_list else ''}.", sub_defaults)
    return rows


def fields_table(cls: type[BaseModel], width: int = 120) -> str:
    rows = field_rows(cls)
    w_name = min(36, max(len(r.name) for r in rows))
    w_type = min(28, max(len(r.type) for r in rows))
    w_def = min(18, max(len(r.default) for r in rows))
    lines = []
    for r in rows:
        head = f"  {r.name:<{w_name}}  {r.type:<{w_type}}  {r.default:<{w_def}}"
        lines.append(f"{head}  {r.description}".rstrip())
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- arguments
def help_text(cls: type[BaseModel], usage: str, about: str = "") -> str:
    parts = [f"usage: {usage}", ""]
    if about:
        parts += [about.strip(), ""]
    parts += ["options:",
              "  -h, --help        show this help and exit",
              f"  {PRINT}    print the resolved config (YAML) and exit without starting anything", "",
              "config fields (NAME  TYPE  DEFAULT  DESCRIPTION); override any one as NAME=VALUE (a YAML value):",
              fields_table(cls)]
    return "\n".join(parts)


def print_config(cfg: BaseModel) -> None:
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True), end="")


def parse_config_args(
    cls: type[T], argv: list[str], usage: str, about: str = "",
    load: Callable[[str, list[str]], T] | None = None,
) -> T | int:
    """`CONFIG [key.sub=value ...] [--print-config | --help]` -> the validated config, or the exit code when the
    command is done: 0 after --help / --print-config, 2 after a usage or config error (one line on stderr).

    `load(first, overrides)` builds the config from the first argument (default: a YAML file of `cls`).
    """
    if any(a in HELP for a in argv):
        print(help_text(cls, usage, about))
        return 0
    printing = PRINT in argv
    args = [a for a in argv if a != PRINT]
    unknown = [a for a in args if a.startswith("--")]
    if unknown or not args:
        what = f"error: unknown option {unknown[0]}" if unknown else f"usage: {usage}"
        print(f"{what} (--help lists the options and the config fields)", file=sys.stderr)
        return 2
    try:
        cfg = (load or (lambda path, rest: load_config(cls, path, rest)))(args[0], args[1:])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if printing:
        print_config(cfg)
        return 0
    return cfg
