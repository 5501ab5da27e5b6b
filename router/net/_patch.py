"""Replacing a method of a library class (hypercorn, trio) in place, marked so it can be checked."""

from __future__ import annotations

_MARK = "_miles_router_fix"


def replace(cls: type, name: str, fn) -> object:
    """Put `fn` in place of `cls.name`, marked as ours; returns the attribute it replaced."""
    original = getattr(cls, name)
    setattr(fn, _MARK, True)
    setattr(cls, name, fn)
    return original


def replaced(cls: type, name: str) -> bool:
    """Whether `cls.name` is one of ours."""
    return getattr(getattr(cls, name, None), _MARK, False)
