"""PostgreSQL for the tests: a throwaway server, and one fresh database per test.

TEST_POSTGRES_URL names a server to use (.ci/run starts one and sets it). Without it, `Cluster`
starts one from Debian's binaries (/usr/lib/postgresql/*/bin): a private data folder under /tmp,
listening only on a unix socket in that folder (no TCP port to clash with anything), trust auth,
no fsync. A root caller runs the server as the `postgres` OS user, as PostgreSQL refuses root.

Each cluster folder holds an `owner` file with the pid of the process that started it; a folder
whose owner is gone (a test run killed before it could clean up) is stopped and removed by the
next start. .ci/run does the same with the same prefix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

PREFIX = "lymphoma-pg-"
BIN_GLOB = "/usr/lib/postgresql/*/bin"
INSTALL_HINT = (
    "the PostgreSQL tests need a server: set TEST_POSTGRES_URL=postgresql+psycopg://USER@HOST/DB (a database "
    "the user may CREATE DATABASE from), or install Debian's `postgresql` package (apt-get install -y "
    "postgresql) so that the tests start their own; `make test` does the latter"
)


def find_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin folder that has a server (initdb), if any."""
    found = [p for p in Path("/").glob(BIN_GLOB.lstrip("/")) if (p / "initdb").exists() and (p / "pg_ctl").exists()]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, default=None)


def _pid_alive(pid: int) -> bool:
    return pid > 0 and Path(f"/proc/{pid}").exists()


class Cluster:
    """A throwaway server: `start()` returns its URL (database `postgres`), `stop()` removes it all."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.root: Path | None = None

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        as_postgres = {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            cwd=self.root or "/",
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
            **as_postgres,
        )

    def start(self) -> str:
        remove_orphans(self.bin)
        self.root = Path(tempfile.mkdtemp(prefix=PREFIX))
        (self.root / "owner").write_text(str(os.getpid()))
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        data = self.root / "data"
        try:
            self._run(
                "initdb",
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            )
            options = (
                f"-c listen_addresses='' -c unix_socket_directories='{self.root}' -c port=5432 "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
            )
            self._run(
                "pg_ctl", "-D", str(data), "-l", str(self.root / "server.log"), "-o", options, "-w", "-t", "60", "start"
            )
        except subprocess.CalledProcessError as exc:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            self.stop()
            raise RuntimeError(f"could not start PostgreSQL ({' '.join(exc.cmd[:1])}): {exc.stderr}{log}") from exc
        return f"postgresql+psycopg://postgres@/postgres?host={self.root}"

    def stop(self) -> None:
        if self.root is None:
            return
        stop_cluster(self.bin, self.root)
        self.root = None


def stop_cluster(bin_dir: Path, root: Path) -> None:
    if (root / "data" / "postmaster.pid").exists():
        as_postgres = {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}
        subprocess.run(
            [str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "-w", "stop"],
            cwd="/",
            capture_output=True,
            timeout=60,
            **as_postgres,
        )
    shutil.rmtree(root, ignore_errors=True)


def remove_orphans(bin_dir: Path) -> None:
    """Stop and remove clusters left by runs that died without cleaning up (their owner is gone)."""
    for root in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        try:
            owner = int((root / "owner").read_text().strip() or 0)
        except (OSError, ValueError):
            owner = 0
        if owner and not _pid_alive(owner):
            stop_cluster(bin_dir, root)


def _admin(url: str):
    return create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)


def wait_until_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with _admin(url).connect() as conn:
                conn.execute(text("SELECT 1"))
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def create_database(server_url: str) -> str:
    """A new, empty database on the server; returns its URL (same user, host and options)."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    engine = _admin(server_url)
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, url: str) -> None:
    """Drop a database made by create_database; FORCE ends connections left by killed processes."""
    name = make_url(url).database
    engine = _admin(server_url)
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()
