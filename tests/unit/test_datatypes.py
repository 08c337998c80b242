"""nswrap.datatypes: what @dataclass(frozen=True) gives, which the rest of nswrap relies on."""

from __future__ import annotations

import dataclasses

import pytest

from nswrap.datatypes import FrozenError, datatype, field, fields, replace, sort_key


@datatype(order=True)
class Point:
    x: int
    y: int = 0
    tags: tuple[str, ...] = ()


@datatype
class Other:
    x: int
    y: int = 0
    tags: tuple[str, ...] = ()


@datatype(frozen=False)
class Bag:
    name: str
    items: list[str] = field(default_factory=list)


@datatype
class Checked:
    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError("negative")


@dataclasses.dataclass(frozen=True, order=True)
class Reference:
    x: int
    y: int = 0
    tags: tuple[str, ...] = ()


def test_construction_equality_and_hash_as_dataclasses():
    assert Point(1) == Point(1, 0, ()) == Point(x=1, tags=())
    assert Point(1, 2) != Point(2, 1)
    assert len({Point(1), Point(1), Point(2)}) == 2
    assert Point(1) != Other(1) and Point(1) != (1, 0, ())  # the exact class, not the field values
    assert repr(Point(1, 2, ("a",))) == repr(Reference(1, 2, ("a",))).replace("Reference", "Point")
    assert fields(Point(1)) == ("x", "y", "tags")
    with pytest.raises(TypeError):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Point(1, z=3)  # type: ignore[call-arg]


def test_order_as_dataclasses():
    values = [(2, 1), (1, 5), (1, 2), (3, 0)]
    assert [(p.x, p.y) for p in sorted(Point(*v) for v in values)] == \
        [(r.x, r.y) for r in sorted(Reference(*v) for v in values)]
    assert sorted((Point(*v) for v in values), key=sort_key(Point)) == sorted(Point(*v) for v in values)
    assert Point(1) <= Point(1) < Point(1, 1) and Point(2) > Point(1, 9) >= Point(1, 9)
    with pytest.raises(TypeError):
        _ = Point(1) < Other(2)


def test_frozen_unless_asked():
    p = Point(1)
    with pytest.raises(FrozenError):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del p.x
    bag = Bag("b")
    bag.items.append("one")
    bag.name = "c"
    assert Bag("b").items == [] and bag == Bag("c", ["one"])  # a fresh list each
    with pytest.raises(TypeError):
        hash(bag)


def test_post_init_and_replace():
    assert Checked(1).n == 1
    with pytest.raises(ValueError):
        Checked(-1)
    assert replace(Point(1, 2), y=3) == Point(1, 3)
    with pytest.raises(ValueError):
        replace(Checked(1), n=-1)
    with pytest.raises(TypeError):
        replace(Point(1), z=1)


def test_any_field_name_and_own_methods():
    @datatype
    class Names:
        d: int  # the compiled __init__'s own locals cannot shadow a field
        missing: int = 0

        def __repr__(self) -> str:  # written by the class: kept
            return "mine"

    assert (Names(1, 2).d, Names(1, 2).missing, repr(Names(1))) == (1, 2, "mine")


@pytest.mark.parametrize("body", [
    "x: int = 0\n    y: int",  # a field without a default after one with
    "xs: list = []",  # one list for every instance
    "_x: int",  # a name the compiled __init__ keeps for itself
    "self: int",
], ids=["order", "mutable-default", "underscore", "self"])
def test_refused_as_dataclasses_refuses_or_init_could_not_take(body):
    scope = {"datatype": datatype}
    with pytest.raises(TypeError):
        exec(f"@datatype\nclass Bad:\n    {body}\n", scope)


def test_inheritance():
    @datatype
    class Base:
        a: int

    @datatype
    class Child(Base):
        b: int = 0

    assert fields(Child(1)) == ("a", "b") and Child(1) != Base(1)
    with pytest.raises(TypeError):
        @datatype(frozen=False)
        class Loose(Base):
            c: int = 0
