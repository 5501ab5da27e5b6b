"""A throwaway PostgreSQL cluster for tests (and bench/bench_store.py): initdb + pg_ctl in a temp folder.

The binaries are Debian's (`apt-get install postgresql`: /usr/lib/postgresql/<version>/bin; .ci/run installs
them). PostgreSQL refuses to run as root, so as root the cluster runs as the unprivileged `nobody` user (its
folder is chown'd to it); otherwise as the current user. It listens on a free loopback port, its unix socket
lives in its own folder, authentication is `trust` (loopback only), and it is stopped and deleted by `destroy`.

Without the binaries the PostgreSQL tests skip with the reason, unless MILES_ROUTER_REQUIRE_PG=1 (set by
.ci/run), which turns the skip into a failure: CI never passes by skipping them.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from harness import free_port

REQUIRE_ENV = "MILES_ROUTER_REQUIRE_PG"
BIN_ENV = "MILES_ROUTER_PG_BIN"  # another layout's bin folder (initdb, pg_ctl), instead of Debian's
SUPERUSER = "postgres"  # the cluster's superuser role (initdb -U), whatever OS user runs it


def find_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian layout, or $MILES_ROUTER_PG_BIN), or None."""
    if os.environ.get(BIN_ENV):
        given = Path(os.environ[BIN_ENV])
        return given if (given / "initdb").exists() else None
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    if not found:
        return None
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def missing_reason() -> str | None:
    """Why no throwaway cluster can be started here, or None when it can."""
    if find_bin_dir() is not None:
        return None
    if os.environ.get(BIN_ENV):
        return f"PostgreSQL is not installed ({BIN_ENV}={os.environ[BIN_ENV]} has no initdb)"
    return "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; apt-get install postgresql)"


class TempCluster:
    """One PostgreSQL server on 127.0.0.1:<port>, its data in a temp folder."""

    def __init__(self, *, settings: dict | None = None) -> None:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise RuntimeError(missing_reason())
        self.bin = bin_dir
        as_root = os.geteuid() == 0
        # as root, under /tmp: the unprivileged server must be able to reach its folder (TMPDIR may not let it)
        self.folder = Path(tempfile.mkdtemp(prefix="miles-pg-", dir="/tmp" if as_root else None))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.port = free_port()
        self.settings = {"listen_addresses": "127.0.0.1", "port": str(self.port),
                         "unix_socket_directories": str(self.folder), "max_connections": "200",
                         "shared_buffers": "32MB", **(settings or {})}
        self.running = False
        self._as = {}
        if as_root:  # postgres will not run as root: run it as nobody
            user = pwd.getpwnam("nobody")
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            self._as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C",
                  "--no-sync")
        with open(self.data / "postgresql.conf", "a") as f:
            for k, v in self.settings.items():
                f.write(f"{k} = '{v}'\n")

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        r = subprocess.run([str(self.bin / tool), *args], capture_output=True, text=True, timeout=timeout,
                           cwd=self.folder, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
                           **self._as)
        if r.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({r.returncode}): {r.stderr or r.stdout}\n{log}")

    def start(self) -> None:
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast`: disconnect clients, clean shutdown; `immediate`: like a crash)."""
        if self.running:
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60")
            self.running = False

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

