"""The TOML config file (`--config FILE`, `NSWRAP_CONFIG`): read, size-limited, checked key by key.

Keys are the long option names of `nswrap run` plus `command`; cli.py passes their kinds. Any
problem is one UsageError naming the file (and the key).
"""

from __future__ import annotations

import os
import stat
from typing import Any

from nswrap.errors import UsageError

MAX_SIZE = 1 << 20

KIND_TEXT = {"list": "a list of strings", "str": "a string", "number": "a number", "int": "an integer",
             "bool": "true or false"}


def _load(path: str) -> dict[str, Any]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"config file {path}: not a regular file")
        data = os.read(fd, MAX_SIZE + 1)
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_SIZE:
        raise UsageError(f"config file {path}: larger than {MAX_SIZE // 1024} KiB")
    import tomllib  # here: only a start with --config pays for it (docs/design.md, "Why our own netlink")

    try:
        return tomllib.loads(data.decode("utf-8-sig"))  # a byte order mark (Windows editors) is fine
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"config file {path}: not valid TOML: {e}") from None


def read(path: str, keys: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """{parameter name: value} from the file; `keys` maps TOML keys to (parameter, kind)."""
    data = _load(path)
    values = {}
    for key, value in data.items():
        if key not in keys:
            raise UsageError(f"config file {path}: unknown key {key!r} (known: {', '.join(sorted(keys))})")
        name, kind = keys[key]
        if key in ("ports", "mark-mask"):  # TOML numbers are fine here: ports = [53], mark-mask = 0xf0000000
            value = [_int_to_str(v) for v in value] if isinstance(value, list) else _int_to_str(value)
        if kind == "list" and isinstance(value, str):
            value = [value]
        if not _has_kind(value, kind):
            raise UsageError(f"config file {path}: key {key!r} must be {KIND_TEXT[kind]}, not {_toml_type(value)} {value!r}")
        values[name] = value
    return values


def _int_to_str(value: object) -> object:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _has_kind(value: object, kind: str) -> bool:
    if kind == "list":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # number


def _toml_type(value: object) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}.get(
        type(value), "date/time")
