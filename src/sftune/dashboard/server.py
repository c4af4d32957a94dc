"""Serving the dashboard: the host and port, the access token for non-local hosts, uvicorn."""

from __future__ import annotations

import ipaddress
import secrets
import socket
from pathlib import Path

from sftune.errors import SftuneError


def is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def free_port(host: str, preferred: int = 7860) -> int:
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            try:
                s.bind((host.strip("[]"), port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise SftuneError(f"no free port on {host}")


def serve(runs_dir: str | Path, *, host: str = "127.0.0.1", port: int | None = None, token: str | None = None) -> None:
    try:
        import uvicorn

        from sftune.dashboard.app import create_app
    except ImportError as e:
        raise SftuneError(f"sftune ui needs its extra: pip install 'sftune[ui]' ({e.name} is missing)") from None
    from sftune.console import console

    root = Path(runs_dir)
    if not root.is_dir():
        raise SftuneError(f"runs directory '{root}' does not exist: train a run first, e.g. "
                          f"sftune train quickstart train.max_steps=200 train.output_dir={root}/quickstart")
    local = is_local(host)
    if not local and not token:
        token = secrets.token_urlsafe(24)  # exposing the dashboard always takes a token
    port = port or free_port(host)
    url_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    url = f"http://{url_host}:{port}/" + (f"?token={token}" if token else "")
    console.print(f"sftune dashboard for [bold]{root.resolve()}[/] at [bold]{url}[/] (Ctrl-C stops it)",
                  soft_wrap=True)
    uvicorn.run(create_app(root, token=token, local_only=local), host=host.strip("[]"), port=port,
                log_level="warning")
