"""A throwaway PostgreSQL server for the tests that run a store against the
real thing (tests/test_memory.py, tests/test_shared_store.py): initdb +
pg_ctl, 127.0.0.1, a free port, password auth, one per test session (the
`pg_server` fixture is registered in tests/conftest.py), stopped at the end.
Without the binaries (`apt-get install postgresql`; tests/system-deps.sh)
the tests that need it are skipped with the reason.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_USER = "memtest"


def pg_binaries() -> tuple[str, str] | None:
    """initdb and pg_ctl from PATH, else from Debian's versioned directory (newest first)."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return initdb, pg_ctl
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                         if Path(p).parent.name.isdigit() else 0, reverse=True):
        if os.access(f"{bindir}/initdb", os.X_OK) and os.access(f"{bindir}/pg_ctl", os.X_OK):
            return f"{bindir}/initdb", f"{bindir}/pg_ctl"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[dict[str, str]]:
    """A PostgreSQL cluster for this test run: → {"dsn": with password, "password": ...}.

    initdb refuses to run as root, so as root the cluster belongs to the
    `postgres` system user (Debian's package creates it) and every server
    command runs through `runuser -u postgres --`.
    """
    binaries = pg_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL not installed: initdb and pg_ctl not found on PATH or in "
                    "/usr/lib/postgresql/*/bin (apt-get install -y postgresql)")
    initdb, pg_ctl = binaries
    prefix: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            owner = None
        if runuser is None or owner is None:
            pytest.skip("running as root and initdb refuses root: needs runuser and a `postgres` user")
        prefix = [runuser, "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="va-pg-"))
    data, sockets, pwfile, logfile = base / "data", base / "sock", base / "pw", base / "server.log"
    sockets.mkdir()
    password = secrets.token_urlsafe(16)
    pwfile.write_text(password + "\n")
    if owner is not None:
        for path in (base, sockets, pwfile):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    os.chmod(base, 0o700)
    port = free_port()

    def run(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=120)

    run(initdb, "-D", str(data), "-U", PG_USER, f"--pwfile={pwfile}", "--auth-host=scram-sha-256",
        "--auth-local=trust", "-E", "UTF8", "--no-locale", "--no-sync")
    options = f"-h 127.0.0.1 -p {port} -k {sockets} -c fsync=off -c full_page_writes=off"
    try:
        run(pg_ctl, "-D", str(data), "-l", str(logfile), "-o", options, "-w", "-t", "60", "start")
    except subprocess.CalledProcessError:
        log_text = logfile.read_text(errors="replace") if logfile.exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {log_text[-2000:]}")
    try:
        yield {"dsn": f"postgresql://{PG_USER}:{password}@127.0.0.1:{port}/postgres", "password": password}
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


_db_counter = itertools.count()


async def fresh_pg_schema(dsn: str) -> str:
    """A DSN whose tables land in a new, empty schema, so every test starts
    clean (a schema costs milliseconds; CREATE DATABASE costs seconds on a
    busy machine). asyncpg passes unknown DSN parameters on as server
    settings, here `search_path`."""
    import asyncpg

    name = f"memtest_{os.getpid()}_{next(_db_counter)}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{name}"')
    finally:
        await conn.close()
    return f"{dsn}?search_path={name}"
