"""`@datatype`: nswrap's record classes, as `@dataclass` makes them, without its start-up cost.

A class decorated `@datatype` gets what `@dataclass(frozen=True)` gives it: an `__init__` taking
the annotated fields in order (defaults from the class body, `field(default_factory=list)` for a
fresh object per instance), equality and hashing by its fields and its exact class, ordering with
`order=True`, a repr, and assignment refused (`frozen=False` allows it, and drops hashing, as
dataclasses does).

Why not dataclasses: it compiles each of those methods with `exec`, about 1 ms per class on a
2-CPU VM, and nswrap defines ~60 classes, all imported on every start. Measured with
`python -X importtime` on `nswrap --ports 53 -- true`, nswrap's own imports took 155 ms with
dataclasses and 75 ms with this module, of a start of about 280 ms. Here `__init__` alone is
compiled, since it must bind arguments as fast as Python can; the other methods are shared
functions over one `operator.attrgetter` per class.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from typing import Any, TypeVar, dataclass_transform

T = TypeVar("T")

FIELDS = "__datatype_fields__"
FROZEN = "__datatype_frozen__"
KEY = "__datatype_key__"
MUTABLE = (list, dict, set)  # as a default, shared by every instance: dataclasses refuses them
_MISSING = object()


class FrozenError(AttributeError):
    pass


class _Factory:
    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


def field(*, default_factory: Callable[[], T]) -> T:
    """A default made afresh for each instance (dataclasses.field's own signature)."""
    return _Factory(default_factory)  # type: ignore[return-value]  # the class body's stand-in


def _key(names: tuple[str, ...]):
    if not names:
        return lambda _: ()
    get = operator.attrgetter(*names)
    return get if len(names) > 1 else lambda obj: (get(obj),)


def _init(cls, names: tuple[str, ...], defaults: dict):
    """The one compiled method: `def __init__(self, a, b=<default>)`, storing straight into the
    instance's dict (what dataclasses does for a frozen class through object.__setattr__)."""
    params, body, scope = [], [], {"_missing": _MISSING}
    for name in names:
        if name not in defaults:
            params.append(name)
        elif isinstance(defaults[name], _Factory):
            scope[f"_make_{name}"] = defaults[name].make
            params.append(f"{name}=_missing")
            body.append(f"if {name} is _missing: {name} = _make_{name}()")
        else:
            scope[f"_default_{name}"] = defaults[name]
            params.append(f"{name}=_default_{name}")
        body.append(f"_d[{name!r}] = {name}")
    post = "self.__post_init__()" if hasattr(cls, "__post_init__") else ""
    source = f"def __init__(self, {', '.join(params)}):\n _d = self.__dict__\n " + "\n ".join([*body, post, "pass"])
    exec(source, scope)  # noqa: S102 (our own field names, checked by _fields)
    init = scope["__init__"]
    setattr(init, "__qualname__", f"{cls.__qualname__}.__init__")  # noqa: B010 (init is typed object)
    return init


@dataclass_transform(frozen_default=True, field_specifiers=(field,))  # type checkers see a dataclass
def datatype(cls: Any = None, /, *, frozen: bool = True, order: bool = False) -> Any:
    def make(cls):
        names, defaults = _fields(cls, frozen)
        key = _key(names)

        def __eq__(self, other):  # noqa: N807
            return key(self) == key(other) if other.__class__ is self.__class__ else NotImplemented

        def __repr__(self):  # noqa: N807
            return f"{type(self).__qualname__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"

        methods = {"__init__": _init(cls, names, defaults), "__eq__": __eq__, "__repr__": __repr__,
                   "__hash__": (lambda self: hash(key(self))) if frozen else None}
        if frozen:
            methods.update(__setattr__=_refuse, __delattr__=_refuse)
        if order:
            for name, compare in (("__lt__", operator.lt), ("__le__", operator.le), ("__gt__", operator.gt),
                                  ("__ge__", operator.ge)):
                methods[name] = _comparison(key, compare)
        for name, method in methods.items():
            # a method the class writes itself stays (as with dataclasses), except the __hash__
            # that Python sets to None in a class body that defines __eq__
            if name not in cls.__dict__ or (name == "__hash__" and cls.__dict__[name] is None):
                setattr(cls, name, method)
        setattr(cls, FIELDS, names)
        setattr(cls, FROZEN, frozen)
        setattr(cls, KEY, key)
        setattr(cls, "__match_args__", names)  # noqa: B010 (mypy: a class attribute it cannot see)
        return cls

    return make if cls is None else make(cls)


def _fields(cls: type, frozen: bool) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The fields of *cls* in order (its base's first) and their defaults, refused where
    dataclasses refuses them, or where the compiled __init__ could not take them."""
    bases = [base for base in cls.__mro__[1:-1] if FIELDS in base.__dict__]
    if len({getattr(base, FIELDS) for base in bases if base in cls.__bases__}) > 1:
        raise TypeError(f"{cls.__name__}: fields from more than one base")
    if bases and getattr(bases[0], FROZEN) != frozen:
        raise TypeError(f"{cls.__name__}: frozen and not frozen datatypes cannot inherit from each other")
    inherited = getattr(bases[0], FIELDS) if bases else ()
    # the class body's dict where there is one (to Python 3.13); 3.14 makes annotations lazily
    annotations = cls.__dict__.get("__annotations__") or inspect.get_annotations(cls)
    own = tuple(n for n, kind in annotations.items() if "ClassVar" not in str(kind))
    names = inherited + tuple(n for n in own if n not in inherited)
    defaults, seen_default = {}, ""
    for n in names:
        if not n.isidentifier() or n.startswith("_") or n == "self":
            raise TypeError(f"{cls.__name__}: {n!r} cannot be a field name")
        if hasattr(cls, n):
            defaults[n] = getattr(cls, n)
            if isinstance(defaults[n], MUTABLE):
                raise TypeError(f"{cls.__name__}.{n}: a mutable default is shared; use field(default_factory=...)")
            seen_default = n
        elif seen_default:
            raise TypeError(f"{cls.__name__}: field {n!r} without a default follows one with a default")
    return names, defaults


def _refuse(self, name, *_):
    raise FrozenError(f"cannot assign to field {name!r} of a {type(self).__name__}")


def _comparison(key, compare):
    def method(self, other):
        return compare(key(self), key(other)) if other.__class__ is self.__class__ else NotImplemented
    return method


def fields(obj: object) -> tuple[str, ...]:
    names: tuple[str, ...] = getattr(obj, FIELDS)
    return names


def sort_key(cls: type) -> Callable[[Any], tuple]:
    """The fields of *cls* as one tuple, read in C: `sorted(items, key=sort_key(C))` orders as
    `order=True` does without a Python-level __lt__ per comparison (a thousand nft elements)."""
    key: Callable[[Any], tuple] = getattr(cls, KEY)
    return key


def replace(obj: T, **changes: Any) -> T:
    """A copy of *obj* with some fields changed (dataclasses.replace)."""
    unknown = set(changes) - set(fields(obj))
    if unknown:
        raise TypeError(f"{type(obj).__name__} has no field {sorted(unknown)[0]!r}")
    return type(obj)(**{n: changes[n] if n in changes else getattr(obj, n) for n in fields(obj)})
