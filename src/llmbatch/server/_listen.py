"""What `llmbatch serve` takes before it says it is serving: the port, and the data directory.

uvicorn binds its port only once the app's lifespan has started, after "starting on ..." was
printed, and a busy port then ended the process with uvicorn's own `[Errno 98]` lines. Binding
the socket here first lets the CLI refuse in one line naming the port and `--port`.

Two servers on one data directory would each resume the other's batches and write the same
output files; a lock held for the server's lifetime makes the second one refuse instead.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from filelock import FileLock, Timeout

from .._exceptions import ConfigError

__all__ = ["LOCK_NAME", "bind_port", "lock_data_dir"]

#: The lock file in a server's data directory, held while a server uses it.
LOCK_NAME = "server.lock"


def bind_port(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host`:`port`, or a ConfigError naming the port and `--port`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host!r}: {exc.strerror}; check --host") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # As uvicorn does: a port left in TIME_WAIT by a server that just stopped can be reused;
        # one another process listens on still cannot (Linux refuses the bind).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is already in use (another llmbatch serve?): "
                f"stop that server or choose another port with --port"
            ) from None
        if exc.errno == errno.EACCES:
            raise ConfigError(f"no permission to listen on port {port}: choose one above 1023 with --port") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}; check --host and --port") from None
    sock.set_inheritable(True)
    return sock


def lock_data_dir(data_dir: Path) -> FileLock:
    """Holds `data_dir`'s server lock (release it when the server stops), or raises ConfigError
    when another server holds it. The lock is an OS file lock: a server killed with SIGKILL
    leaves the file, but not the lock, so the next start is not refused."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create --data-dir {data_dir}: {exc.strerror}") from None
    lock = FileLock(data_dir / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError(
            f"another llmbatch server is using --data-dir {data_dir}: stop it, or give this server "
            f"another --data-dir (two servers on one directory would run the same batches)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot lock --data-dir {data_dir}: {exc.strerror}") from None
    return lock
