"""Every config key is in README's configuration table (the team's rule), read from the Structs themselves."""

from __future__ import annotations

from pathlib import Path

import msgspec.inspect

from router.config import Config

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _table() -> tuple[str, list[str]]:
    section = README[README.index("## Configuration reference"):README.index("## API reference")]
    return section, [line for line in section.splitlines() if line.startswith("| `")]


def test_every_config_key_is_in_the_readme_table():
    section, rows = _table()
    missing = []
    for table in msgspec.inspect.type_info(Config).fields:
        if table.name in ("base_dir", "routes"):  # not a key / a list of tables with its own row
            continue
        for key in msgspec.inspect.type_info(table.type.cls).fields:
            full = f"{table.name}.{key.name}"
            # `table.key`, or a row naming `table.` first and then `key` (`workers.a` / `b`), or `table.*`
            if (f"`{full}`" not in section and f"`{table.name}.*`" not in section
                    and not any(f"`{table.name}." in r.split("|")[1] and f"`{key.name}`" in r.split("|")[1]
                                for r in rows)):
                missing.append(full)
    assert missing == [], f"config keys missing from README's configuration table: {missing}"
    assert "`[[routes]] path, method, pipeline, policy`" in section
