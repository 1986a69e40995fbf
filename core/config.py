"""Typed configs: pydantic models loaded from YAML, overridable as `key.sub=value` on the command line.

Errors are one line naming the bad field (`ConfigError`), raised before anything starts.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A bad config: the message names the field."""


def absolute_path(value: str | None) -> str | None:
    """Paths in configs are resolved against the directory the command runs in (Ray workers run elsewhere).

    "local-dir:REL" (open_clip's folder scheme) keeps its prefix; URLs and model names without a path separator
    that do not exist on disk are left alone.
    """
    if not value or "://" in value:
        return value
    prefix, path = ("local-dir:", value[len("local-dir:"):]) if value.startswith("local-dir:") else ("", value)
    if Path(path).is_absolute() or (not prefix and "/" not in path and not Path(path).exists()):
        return value
    return prefix + str(Path(path).resolve())


def parse_override(item: str) -> tuple[list[str], object]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    if not key or any(not k for k in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k, {}), dict):
                raise ConfigError(f"{'.'.join(keys)}: {k} is not a section")
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return data


def with_section_defaults(cls: type[BaseModel], data: dict) -> dict:
    """Fill a section the config names only in part from its field's own default.

    `EvalConfig.sample` defaults to `SampleConfig(cfg_scale=3.0, top_k=32, ...)`; an override `sample.top_k=4`
    must change top_k only, not fall back to SampleConfig's class defaults (no guidance, no top-p) for the rest.
    """
    for name, field in cls.model_fields.items():
        sub = data.get(name)
        default = field.get_default(call_default_factory=True)
        if isinstance(sub, dict) and isinstance(default, BaseModel):
            data = {**data, name: deep_merge(default.model_dump(exclude_unset=True), sub)}
    return data


class Sections(BaseModel):
    """A config model whose partly given sections keep their field's own defaults for the rest
    (`with_section_defaults`), the same whether it is built from YAML, overrides or keyword arguments."""
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _section_defaults(cls, data):
        return with_section_defaults(cls, data) if isinstance(data, dict) else data


def deep_merge(base: dict, top: dict) -> dict:
    """A copy of base with top's keys laid over it, section by section."""
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


TYPE_TAGS = {"int", "float", "str", "bool", "bytes", "none", "dict", "list", "tuple", "set"}


def is_union_tag(part) -> bool:
    """pydantic names the member of a union in an error's location (`top_k.int`, `top_k.list[int]`); a field
    name never looks like a type."""
    return isinstance(part, str) and (part in TYPE_TAGS or "[" in part or part[:1].isupper())


def format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    field = ".".join(str(p) for p in first["loc"] if not is_union_tag(p))
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if msg != first["msg"]:  # a cross-field check of a model validator names its field itself ...
        if not field:
            return f"{msg}{more}"
        sub = re.match(r"([A-Za-z_][A-Za-z0-9_]*): ", msg)  # ... relative to the section it validates
        if sub and first["type"] == "value_error" and not isinstance(first["loc"][-1], int):
            if sub.group(1) == str(first["loc"][-1]):  # a field validator that repeats its field's name
                return f"{field}: {msg[sub.end():]}{more}"
            return f"{field}.{msg}{more}"
    return f"{field or 'config'}: {msg}{more}"


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] = (), context: dict | None = None) -> T:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config: file {path} not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config: {path} is not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise ConfigError(f"config: {path} cannot be read ({e.strerror or type(e).__name__})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config: {path} must hold a mapping at the top level")
    data = apply_overrides(data, list(overrides))
    try:
        return cls.model_validate(data, context=context)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
    except ValueError as e:  # raised by our own validators outside pydantic's wrapping
        raise ConfigError(str(e).splitlines()[0]) from None


SECRET_WORDS = {"KEY", "APIKEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "AUTH"}


def env_secrets(env=None) -> dict[str, str]:
    """name -> value of the environment variables that look like secrets (WANDB_API_KEY, HF_TOKEN, ...): a part of
    the name between underscores is one of SECRET_WORDS (not TOKENIZERS_PARALLELISM); values under 6 characters
    are left alone."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if SECRET_WORDS & set(k.upper().split("_")) and len(v) >= 6}


def redact_secrets(obj, env=None):
    """A copy of a JSON-able structure where every string holding a secret env var's value shows its name instead.

    Config dumps (RUN/config.yaml, wandb's config) go through this: a key passed on the command line or written
    into a config as a literal never reaches the run directory.
    """
    secrets = env_secrets(env)
    if not secrets:
        return obj

    def walk(x):
        if isinstance(x, str):
            for name, value in secrets.items():
                x = x.replace(value, f"<${name}>")
            return x
        if isinstance(x, dict):
            return {walk(k): walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        return x
    return walk(obj)
