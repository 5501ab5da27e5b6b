"""Docs that cannot drift: README's configuration table is checked against the config Structs (every key
documented, no key that does not exist, the defaults the table states are the code's), and its stage tables
against the stage classes (every built-in stage listed once, with its phase); every test, file and folder the
README, RELIABILITY.md and BENCHMARKS.md name exists."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from router.config import Config
from router.core.pipeline import BUILTIN_STAGES, resolve_stage

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = {name: (ROOT / name).read_text() for name in ("README.md", "RELIABILITY.md", "BENCHMARKS.md")}
# Paths a doc names on purpose although they are gone: where a bug was found or a number measured at the time.
HISTORICAL_PATHS = {
    "router/core/radix.py": "BENCHMARKS.md §7 names the tree's file as it was when the run was made",
    "router/stages/_generate.py": "RELIABILITY.md's found-bugs table says where the bug was (since removed)",
}


def section(title: str) -> str:
    start = README.index(f"\n## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def table_rows(text: str, header: str) -> list[list[str]]:
    """The rows of every markdown table in `text` whose header row starts with `header`."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.startswith("| " + header):
            inside = True
            continue
        if inside and line.startswith("|---"):
            continue
        if inside and line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
            rows.append([c.strip() for c in cells])
        else:
            inside = False
    return rows


def config_keys() -> dict[str, object]:
    """Every key of the config, `section.key` -> its default (routes: `routes.<field>`)."""
    out = {}
    for f in msgspec.structs.fields(Config):
        if f.name == "base_dir":
            continue
        if f.name == "routes":
            from router.config import RouteConfig

            for g in msgspec.structs.fields(RouteConfig):
                out[f"routes.{g.name}"] = g.default
            continue
        table = f.default_factory()
        for g in msgspec.structs.fields(type(table)):
            out[f"{f.name}.{g.name}"] = getattr(table, g.name)
    return out


def documented_keys() -> dict[str, str | None]:
    """README's configuration table: key -> the default it states (None where the row states none for it)."""
    out: dict[str, str | None] = {}
    for key_cell, default_cell, meaning in table_rows(section("Configuration reference"), "key"):
        if key_cell.strip("`").startswith("[[routes]]"):
            for name in re.findall(r"\w+", key_cell.strip("`").split("]]", 1)[1]):
                out[f"routes.{name}"] = None
            continue
        names = re.findall(r"`([^`]+)`", key_cell)
        if names == ["simulate.*"]:
            for name in re.findall(r"`(\w+)`", meaning):
                out[f"simulate.{name}"] = None
            continue
        tablename = names[0].split(".", 1)[0]
        keys = [n if "." in n else f"{tablename}.{n}" for n in names]
        defaults = re.split(r" / |, (?=`|\d)", default_cell) if len(keys) > 1 else [default_cell]
        for i, k in enumerate(keys):
            out[k] = defaults[i].strip() if len(defaults) == len(keys) else None
    return out


_SIZES = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_default(text: str):
    """What a README default cell says, as a value; `...` for a cell that is prose."""
    t = text.strip().strip("`")
    t = re.sub(r"\s*\(.*\)$", "", t).strip().strip("`")
    if t in ("unset", "(none)", "none"):
        return None
    if t in ("true", "false"):
        return t == "true"
    if m := re.fullmatch(r"(\d+) (KiB|MiB|GiB)", t):
        return int(m.group(1)) * _SIZES[m.group(2)]
    if m := re.fullmatch(r"2\^(\d+)", t):
        return 2 ** int(m.group(1))
    if re.fullmatch(r"-?\d+", t):
        return int(t)
    if re.fullmatch(r"-?\d+\.\d*", t):
        return float(t)
    if t in ("[]", "{}"):
        return [] if t == "[]" else {}
    if t.startswith("[") and t.endswith("]"):
        try:
            return msgspec.json.decode(t)
        except msgspec.DecodeError:
            return ...
    if re.fullmatch(r"[\w.:/-]+", t) and text.strip().startswith("`"):
        return t
    return ...


def test_every_config_key_is_documented_and_every_documented_key_exists():
    code, docs = config_keys(), documented_keys()
    assert sorted(set(code) - set(docs)) == [], "config keys missing from README's configuration table"
    assert sorted(set(docs) - set(code)) == [], "README documents config keys that do not exist"


def test_documented_defaults_are_the_code_defaults():
    code, docs = config_keys(), documented_keys()
    checked = 0
    for key, text in docs.items():
        if text is None or text == "":
            continue
        said = parse_default(text)
        if said is ...:
            continue
        actual = code[key]
        if isinstance(actual, msgspec.Struct) or actual is msgspec.NODEFAULT:
            continue
        if isinstance(actual, float) and isinstance(said, int):
            said = float(said)
        assert said == actual, f"README says {key} defaults to {text!r}; the code says {actual!r}"
        checked += 1
    assert checked >= 40  # most rows state a plain default: this is not a test that checks nothing


def test_every_builtin_stage_is_in_a_stage_table_with_its_phase():
    rows = table_rows(README, "stage | phase")
    listed: dict[str, set[str]] = {}
    for name_cell, phase, _ in rows:  # (forward is in both pipelines' tables)
        listed.setdefault(name_cell.strip("`"), set()).add(phase)
    assert set(listed) == set(BUILTIN_STAGES)
    for name, phases in listed.items():
        assert phases == {resolve_stage(name).phase}, name


@pytest.mark.parametrize("text,value", [("`127.0.0.1`", "127.0.0.1"), ("512 MiB", 512 << 20), ("0 (no limit)", 0),
                                        ("unset (no cap)", None), ("2^20", 1 << 20), ("true", True)])
def test_the_default_cells_parse(text, value):
    assert parse_default(text) == value


def test_every_test_the_docs_name_exists():
    defined = set()
    for path in (ROOT / "tests").rglob("*.py"):
        defined |= set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))
        defined.add(path.stem)
    named = {(doc, name) for doc, text in DOCS.items() for name in re.findall(r"`(test_\w+)(?:\.py)?`", text)}
    assert len(named) > 100  # the docs do name their tests: a regex that found nothing would check nothing
    missing = sorted((doc, name) for doc, name in named if name not in defined)
    assert missing == [], "the docs name tests that do not exist"


def test_every_path_the_docs_name_exists():
    named = {(doc, path) for doc, text in DOCS.items()
             for path in re.findall(r"`((?:router|tests|bench|pipelines|docs)/[\w./-]*)", text)}
    assert len(named) > 50
    missing = sorted((doc, p) for doc, p in named
                     if not (ROOT / p).exists() and p not in HISTORICAL_PATHS and not p.startswith("bench/results/"))
    assert missing == [], "the docs name files that do not exist"
    for p in HISTORICAL_PATHS:
        assert not (ROOT / p).exists(), f"{p} exists again: take it off HISTORICAL_PATHS"
