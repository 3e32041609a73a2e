"""`llmbatch dashboard`: the local jobs dashboard, served on 127.0.0.1 until Ctrl+C."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import click

from .. import __version__
from ..dashboard import LOOPBACK_HOSTS, create_app

__all__ = ["dashboard"]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=8001, show_default=True, help="Port (0: any free one).")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The llmbatch home whose jobs to show (its jobs/) [default: $LLMBATCH_HOME].",
)
@click.option(
    "--job-dir",
    "job_root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the jobs live, as `run --job-dir` [default: HOME/jobs].",
)
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Allow a --host other than loopback. The pages have no password: anyone who reaches the port sees the jobs.",
)
def dashboard(host: str, port: int, home: Path | None, job_root: Path | None, allow_remote: bool) -> None:
    """Web pages of the jobs in $LLMBATCH_HOME: progress, spend, batches, failed rows (read-only)."""
    import uvicorn

    from ..jobs import default_job_root

    if home is not None and job_root is not None:
        raise click.UsageError("give --home or --job-dir, not both")
    root = (job_root or (home / "jobs" if home is not None else default_job_root())).expanduser()
    loopback = _is_loopback(host)
    if not loopback and not allow_remote:
        raise click.UsageError(
            f"--host {host} would show every job (input paths, errors, spend) to anyone who can reach this "
            "machine, with no password: keep the default 127.0.0.1 (an SSH tunnel reaches it: "
            "ssh -L 8001:127.0.0.1:8001 HOST), or pass --allow-remote to do it anyway"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise click.UsageError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
    bound = sock.getsockname()[1]
    app = create_app(root, allowed_hosts=list({*LOOPBACK_HOSTS, host}) if loopback else ["*"])
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"llmbatch {__version__} dashboard: http://{shown}:{bound}/ (jobs in {root}; read-only)", err=True)
    if not loopback:
        click.echo(f"warning: serving on {host} without a password (--allow-remote)", err=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
