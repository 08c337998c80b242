"""The TOML config file (`--config FILE`, `NSWRAP_CONFIG`): read, size-limited, checked key by key.

Keys are the long option names of `nswrap run` plus `command`; cli.py passes their kinds. Any
problem is one UsageError naming the file (and the key).
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

from nswrap.errors import UsageError, quoted

MAX_SIZE = 1 << 20
MAX_DEPTH = 32  # nested arrays/tables and parts of a dotted key; nswrap's keys need 1

# What tomllib reads as text, never as structure: strings (multi-line first) and comments. A string
# left open runs to the end of its line (or file) so that no text is scanned twice: linear time.
_OPAQUE = re.compile("|".join((r'"""(?:\\.|.)*?(?:"""|\Z)', r"'''.*?(?:'''|\Z)", r'"(?:\\[^\n]|[^"\\\n])*"?', r"'[^'\n]*'?",
                               r"#[^\n]*")), re.DOTALL)
_BRACKETS = re.compile(r"[\[{]+|[\]}]+")
_DOTTED = re.compile(rf"(?<![A-Za-z0-9_-])(?:[A-Za-z0-9_-]++[ \t]*+\.[ \t]*+){{{MAX_DEPTH}}}")  # linear: no backtracking

KIND_TEXT = {"list": "a list of strings", "argv": 'a list of strings, e.g. ["unbound", "-d"]', "str": "a string",
             "number": "a number", "int": "an integer", "bool": "true or false"}
MAX_INT = 1 << 64  # far past any value of nswrap's; str(), float() and click take any integer below it


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
        text = data.decode("utf-8-sig")  # a byte order mark (Windows editors) is fine
    except UnicodeDecodeError as e:
        raise UsageError(f"config file {path}: not valid TOML: {e}") from None
    if too_deep(text):
        raise UsageError(f"config file {path}: nested too deeply (more than {MAX_DEPTH} levels)")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path}: not valid TOML: {e}") from None
    except ValueError:  # int() past sys.get_int_max_str_digits() (4300 digits), raised through tomllib
        raise UsageError(f"config file {path}: not valid TOML: a number too long to read") from None
    except RecursionError:  # too_deep() should have said so already
        raise UsageError(f"config file {path}: nested too deeply") from None


def too_deep(text: str) -> bool:
    """Whether TOML text nests arrays and tables, or dots a key, more than MAX_DEPTH deep.

    Checked before tomllib sees the text: it parses nesting by recursion (a 200 KB `[[[[...` is
    a RecursionError thousands of lines long), and a key of n dotted parts costs it n² time and
    memory (a 400 KB `a.a.a...` key takes gigabytes). Strings and comments are skipped as tomllib
    would; on text that is not TOML the count may be off, and tomllib then says what is wrong.
    """
    code = _OPAQUE.sub("_", text)  # a quoted key part stays a key part
    if _DOTTED.search(code):
        return True
    depth = 0
    for run in _BRACKETS.finditer(code):
        depth = depth + len(run[0]) if run[0][0] in "[{" else max(0, depth - len(run[0]))
        if depth > MAX_DEPTH:
            return True
    return False


def read(path: str, keys: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """{parameter name: value} from the file; `keys` maps TOML keys to (parameter, kind)."""
    values = {}
    for key, value in _load(path).items():
        if key not in keys:
            raise UsageError(f"config file {path}: unknown key {quoted(key)} (known: {', '.join(sorted(keys))})")
        name, kind = keys[key]
        values[name] = _checked(path, key, kind, value)
    return values


def _checked(path: str, key: str, kind: str, value: Any) -> Any:
    """The value as click takes it from a default_map, or a UsageError naming the key."""
    if any(isinstance(v, int) and abs(v) >= MAX_INT for v in (value if isinstance(value, list) else [value])):
        raise UsageError(f"config file {path}: key {key!r}: an integer out of range (64 bits at most)")
    if key in ("ports", "mark-mask"):  # TOML integers are fine here: ports = [53], mark-mask = 0xf0000000
        value = [_int_to_str(v) for v in value] if isinstance(value, list) else _int_to_str(value)
    if kind == "list" and isinstance(value, str):
        value = [value]
    if not _has_kind(value, kind):
        raise UsageError(f"config file {path}: key {key!r} must be {KIND_TEXT[kind]}, not {_toml_type(value)} {quoted(value)}")
    return value


def _int_to_str(value: object) -> object:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _has_kind(value: object, kind: str) -> bool:
    if kind in ("list", "argv"):
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
