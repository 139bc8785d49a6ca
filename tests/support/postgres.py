"""A real PostgreSQL server for the tests: `initdb` in a temporary folder, `pg_ctl` on a free port of
127.0.0.1 (its unix socket in the same folder). Stop and start keep port and data, for outage tests.

initdb refuses to run as root: as root, the server's commands run as the unprivileged user ``nobody``
(runuser), which owns the folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from support.harness import free_port

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)  # Debian: newest major first
SUPERUSER = "postgres"
RUN_AS = "nobody"  # when the tests run as root


def pg_tool(name: str) -> str | None:
    """A PostgreSQL server command (initdb, pg_ctl) on PATH or in Debian's versioned folders."""
    found = shutil.which(name)
    if found:
        return found
    for folder in PG_BIN_DIRS:
        if (folder / name).is_file():
            return str(folder / name)
    return None


def require_postgres() -> tuple[str, str]:
    """(initdb, pg_ctl); the calling test is skipped without them (failed in CI: make system-deps installs them)."""
    initdb, pg_ctl = pg_tool("initdb"), pg_tool("pg_ctl")
    if initdb is None or pg_ctl is None:
        import pytest

        message = "PostgreSQL server binaries (initdb, pg_ctl) are not installed (make system-deps installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return initdb, pg_ctl


class PostgresServer:
    """One PostgreSQL cluster in ``workdir`` (a fresh temporary folder when None)."""

    def __init__(self, workdir: Path | None = None):
        self.initdb, self.pg_ctl = require_postgres()
        self.as_root = os.geteuid() == 0
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="s2amnet-pg-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data = self.workdir / "data"
        self.port = free_port()
        self._databases = 0
        if self.as_root:
            shutil.chown(self.workdir, RUN_AS)
        self._run([self.initdb, "-D", str(self.data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
                   "--no-sync", "--no-instructions"])

    def _run(self, argv: list[str], timeout: float = 60.0) -> None:
        if self.as_root:
            argv = ["runuser", "-u", RUN_AS, "--", *argv]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=self.workdir)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited with {out.returncode}:\n{out.stdout}\n{out.stderr}"
                               f"\n{self.log()[-3000:]}")

    def url(self, database: str = SUPERUSER) -> str:
        """A plain postgresql:// URL (the service adds its driver)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresServer:
        options = (f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.workdir / "postgres.log"), "-w", "-t", "60",
                   "-o", options, "start"], timeout=90)
        return self

    def stop(self) -> None:
        """A fast shutdown: clients are disconnected at once (an outage, as the service sees it)."""
        if (self.data / "postmaster.pid").exists():
            self._run([self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"], timeout=90)

    def create_database(self, prefix: str = "records") -> str:
        """A new empty database; its URL."""
        import psycopg

        self._databases += 1
        name = f"{prefix}_{self._databases}_{int(time.time() * 1000) % 100000}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={SUPERUSER}",
                             autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "postgres.log").read_text(errors="replace")
        return ""

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.remove()
