"""Options and their validation: the primitives every settings dataclass of fedkd is built from.

A setting is a dataclass field whose metadata says what it accepts (:func:`choice`, :func:`bounded`);
:func:`validate_fields` checks an instance against it and :func:`coerce` turns a TOML, command-line or
Flower value into the field's type, each failing with :class:`ConfigError` naming the key. Both sides of
the trust boundary build on this module (methods, privacy, the trainers, ``fedkd.config``); it imports
nothing of fedkd, and not torch (``fedkd --help`` and a config error stay fast).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: parsing and checking options must not pay for it
    import torch


def kebab(name: str) -> str:
    """A field's key: ``batch_size`` -> ``batch-size``."""
    return name.replace("_", "-")


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it."""


# Where a key applies: every entry point, the Flower app only, or each institution's own setting (which a
# one-machine run and a Flower simulation take from the run config, standing in for every client).
SCOPES = {"run": "every entry point", "flower": "the Flower app only",
          "client": "each client's own (a deployment's node config; fedkd run and simulations: the run config)"}


def described(help: str, *, scope: str = "run", key: str | None = None) -> dict[str, Any]:
    """Field metadata: what the setting means (one line), where it applies (a key of :data:`SCOPES`) and, for a
    field of a settings section, the key that sets it (``student-lr`` for ``StudentSettings.lr``; by default the
    field's name, kebab-case)."""
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r} is not one of {', '.join(SCOPES)}")
    return {"help": help, "scope": scope, **({"key": key} if key else {})}


def choice(*names: str, help: str = "", scope: str = "run", key: str | None = None) -> dict[str, Any]:
    """Field metadata: the value must be one of ``names``."""
    return {"choices": names, **described(help, scope=scope, key=key)}


def bounded(low: float | None = None, high: float | None = None, *, open_low: bool = False, help: str = "",
            scope: str = "run", key: str | None = None) -> dict[str, Any]:
    """Field metadata: the value must lie in [low, high] ((low, high] with ``open_low``)."""
    return {"low": low, "high": high, "open_low": open_low, **described(help, scope=scope, key=key)}


def field_key(f: dataclasses.Field[Any], prefix: str = "") -> str:
    """The config key that sets a settings field: its metadata's ``key``, else ``prefix`` + its name, kebab-case."""
    return f.metadata.get("key") or prefix + kebab(f.name)


# The largest integer a key takes unless its field says otherwise: torch seeds, thread counts and tensor sizes
# overflow (late, with a traceback) beyond a C int.
INT_LIMIT = 2**31 - 1
# Seconds: longer waits overflow the timeouts of threading and gRPC.
TIMEOUT_LIMIT = 7 * 24 * 3600.0
BATCH_LIMIT = 65536


class CliValue(str):
    """Text typed on the command line (``--set KEY=VALUE``): converted to the key's type. A string anywhere
    else (TOML, Flower's run config) must already have the key's type: ``epochs = "5"`` is refused."""



def resolve_device(name: str) -> torch.device:
    """The torch device a ``device`` setting names: auto is CUDA when present; cuda without one is refused."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available; use device=auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def toml_value(value: Any) -> str:
    """A setting's value as TOML writes it (what ``--run-config``, pyproject.toml and task cards read); None, an
    optional key left unset, is "auto"."""
    if value is None:
        return '"auto"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: the same escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


class Section:
    """A settings section (a frozen dataclass whose fields carry their rules): checked on construction."""

    def __post_init__(self) -> None:
        validate_fields(self)


def validate_fields(obj: Any, prefix: str = "") -> None:
    """Check a config dataclass's values against its field metadata (options and settings sections call it from
    __post_init__; a section held by another, marked ``section`` in its metadata, checks itself)."""
    for f in dataclasses.fields(obj):
        if f.name != "options" and not f.metadata.get("section"):
            validate_value(f, getattr(obj, f.name), prefix)


def validate_value(f: dataclasses.Field[Any], value: Any, prefix: str = "") -> None:
    key = field_key(f, prefix)
    meta = f.metadata
    if value is None:
        if f.default is not None:
            raise ConfigError(f"{key}: a value is required")
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_LIMIT and meta.get("high") is None:
        raise ConfigError(f"{key}: {value!r} is out of range (must be <= {INT_LIMIT})")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(meta['choices'])}")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta.get("open_low") and value == low)):
        op = ">" if meta.get("open_low") else ">="
        raise ConfigError(f"{key}: {value!r} is out of range (must be {op} {low})")
    if high is not None and value > high:
        raise ConfigError(f"{key}: {value!r} is out of range (must be <= {high})")


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def coerce(key: str, f: dataclasses.Field[Any], value: Any) -> Any:
    """Convert a TOML or command-line value to the field's type, or fail naming the key."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    optional = "None" in kind
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto", "none"))):
        return None
    expected = _TYPE_WORDS.get(kind.split(" ")[0].replace("|", ""), kind)
    if isinstance(value, str) and not isinstance(value, CliValue) and not kind.startswith("str"):
        raise ConfigError(f"{key}: {value!r} is a string, the key takes {expected}; write it without quotes")
    if kind.startswith("int") and isinstance(value, float):  # TOML's 3.0 is a float: its types are not guessed
        raise ConfigError(f"{key}: {value!r} is a float, the key takes {expected}; write it without a decimal point")
    try:
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind.startswith("int"):
            if isinstance(value, bool) or isinstance(value, float):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind.startswith("str"):
            if not isinstance(value, str):
                raise ValueError
            return str(value)  # a plain str: a CliValue would be pickled into checkpoints as a foreign class
    except (TypeError, ValueError):
        pass
    else:
        raise AssertionError(f"unhandled field type {kind}")
    raise ConfigError(f"{key}: {value!r} is not {expected}")


def argument(kind: type, low: float, high: float) -> Callable[[str], Any]:
    """An argparse ``type`` for a command-line flag: an int or a finite float in [low, high]; anything else is
    refused by argparse with the flag's name (exit status 2)."""
    import argparse

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {_TYPE_WORDS[kind.__name__]}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range (must be from {low:g} to {high:g})")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def address(text: str) -> str:
    """An argparse ``type`` for HOST:PORT (a port from 0 to 65535; [v6]:PORT for IPv6)."""
    import argparse

    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT with a port from 0 to 65535")
    return text


class TrainingDiverged(ConfigError):
    """A loss became NaN or infinite; the message names the key to change (a learning rate)."""


def check_finite(loss: torch.Tensor, key: str, value: float, where: str) -> float:
    """The loss as a float; TrainingDiverged naming ``key`` when it is not finite."""
    number = float(loss.detach())
    if not math.isfinite(number):
        raise TrainingDiverged(f"{key}: {where} diverged (loss {number}) with {key}={value:g}; lower it")
    return number
