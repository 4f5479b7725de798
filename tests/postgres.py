"""A throwaway PostgreSQL server on 127.0.0.1 for the multi-machine tests (Debian package `postgresql`).

initdb and postgres refuse to run as root, so as root they run as the `postgres` user the package creates.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def find_bin() -> Path | None:
    """Folder holding initdb and pg_ctl: the newest /usr/lib/postgresql/<version>/bin, or PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(bindir: Path) -> Iterator[str]:
    """Start a fresh cluster (trust auth, loopback only, no fsync) and yield its SQLAlchemy URL; stop and remove it."""
    as_root = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="autotransfer-pg-", dir="/tmp" if as_root else None))  # postgres must reach it
    prefix: list[str] = []
    if as_root:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()

    def run(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, text=True, timeout=120)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "autotransfer", "--auth=trust", "-E", "UTF8", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
            f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c fsync=off", "start")
        try:
            yield f"postgresql://autotransfer@127.0.0.1:{port}/postgres"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
