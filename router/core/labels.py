"""Worker labels and label selectors, as the SGLang Model Gateway's RL plane (smg 1.13 `/v1/rl`) reads them.

A label is a `key = value` pair of strings a worker carries (from the config, `POST /workers {"labels"}` or
`/add_worker`). A selector picks workers by their labels and built-in fields, Kubernetes style: terms
separated by commas, all of which must hold:

    key=value          the key's value is `value`
    key!=value         the key is absent or has another value
    key in (a,b)       the key's value is one of a, b
    key notin (a,b)    the key is absent or its value is none of a, b

`parse_selector` returns the terms or raises `SelectorError` naming the byte offset where the text stops
making sense (smg's shape: `invalid selector at byte 5: expected operator ...`). Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

# Keys as Kubernetes allows them (a prefix with `/`, dots, dashes); values anything but the selector's own
# punctuation and whitespace, so URLs (`url=http://h:1`) and versions (`weight_version=step-7`) need no quoting.
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
_VALUE = re.compile(r"[^\s,()=!]+")
_OPERATORS = "expected operator (`=`, `!=`, `in`, `notin`)"
MAX_LABELS = 64
MAX_LABEL_CHARS = 256


class SelectorError(ValueError):
    def __init__(self, offset: int, expected: str) -> None:
        super().__init__(f"invalid selector at byte {offset}: {expected}")
        self.offset = offset


class Term(NamedTuple):
    key: str
    op: str  # "=", "!=", "in", "notin"
    values: tuple[str, ...]

    def holds(self, value: str | None) -> bool:
        if self.op in ("=", "in"):
            return value is not None and value in self.values
        return value is None or value not in self.values


class _Scanner:
    __slots__ = ("text", "pos")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def take(self, pattern: re.Pattern, expected: str) -> str:
        self.skip_space()
        m = pattern.match(self.text, self.pos)
        if m is None:
            raise SelectorError(self.pos, expected)
        self.pos = m.end()
        return m.group()

    def literal(self, s: str) -> bool:
        self.skip_space()
        if self.text.startswith(s, self.pos):
            self.pos += len(s)
            return True
        return False

    def word(self, w: str) -> bool:
        """`w` as a whole word (so `key inner=x` is not `key in ner=x`)."""
        self.skip_space()
        end = self.pos + len(w)
        if self.text.startswith(w, self.pos) and (end == len(self.text) or not self.text[end].isalnum()):
            self.pos = end
            return True
        return False

    @property
    def done(self) -> bool:
        self.skip_space()
        return self.pos >= len(self.text)


def parse_selector(text: str) -> tuple[Term, ...]:
    """The terms of a selector (at least one), or SelectorError."""
    s = _Scanner(text)
    terms = []
    while True:
        key = s.take(_KEY, "expected key")
        if s.literal("!="):
            terms.append(Term(key, "!=", (s.take(_VALUE, "expected value after `!=`"),)))
        elif s.literal("="):
            terms.append(Term(key, "=", (s.take(_VALUE, "expected value after `=`"),)))
        else:
            op = "notin" if s.word("notin") else "in" if s.word("in") else None
            if op is None:
                raise SelectorError(s.pos, _OPERATORS)
            if not s.literal("("):
                raise SelectorError(s.pos, f"expected `(` after `{op}`")
            values = [s.take(_VALUE, "expected value")]
            while s.literal(","):
                values.append(s.take(_VALUE, "expected value"))
            if not s.literal(")"):
                raise SelectorError(s.pos, "expected `,` or `)`")
            terms.append(Term(key, op, tuple(values)))
        if s.done:
            return tuple(terms)
        if not s.literal(","):
            raise SelectorError(s.pos, "expected `,` between terms")


def matches(terms: tuple[Term, ...], lookup: Callable[[str], str | None]) -> bool:
    """Whether every term holds; `lookup(key)` is the worker's value for a key (None: absent)."""
    return all(t.holds(lookup(t.key)) for t in terms)


def check_labels(obj: object, where: str = "labels") -> dict[str, str]:
    """A labels object as given (JSON or TOML): a table of string keys to string values. Numbers and booleans
    are taken as their text (`tp = 2` -> "2"); anything else is a ValueError naming the key."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} must be an object of key: value strings, got {type(obj).__name__}")
    if len(obj) > MAX_LABELS:
        raise ValueError(f"{where}: at most {MAX_LABELS} labels, got {len(obj)}")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str) or _KEY.fullmatch(k) is None or len(k) > MAX_LABEL_CHARS:
            raise ValueError(f"{where}: invalid label key {k!r} (letters, digits, '.', '_', '-', '/'; "
                             f"starting with a letter or digit)")
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, (int, float)):
            v = str(v)
        if not isinstance(v, str) or _VALUE.fullmatch(v) is None or len(v) > MAX_LABEL_CHARS:
            raise ValueError(f"{where}.{k}: invalid label value {v!r} (a non-empty string without whitespace, "
                             f"',', '(', ')', '=' or '!')")
        out[k] = v
    return out


def parse_label_list(text: str, where: str = "labels") -> dict[str, str]:
    """`k=v,k2=v2` (the query-string form of `/add_worker?labels=`) as a labels table, or ValueError."""
    pairs = {}
    for item in text.split(","):
        key, eq, value = item.strip().partition("=")
        if not eq:
            raise ValueError(f"{where}: expected key=value, got {item.strip()!r}")
        pairs[key] = value
    return check_labels(pairs, where)
