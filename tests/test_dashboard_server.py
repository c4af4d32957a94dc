"""Unit tests of sftune.dashboard.server: loopback hosts, a free port, and `sftune ui` serving (a token
whenever the dashboard is exposed beyond this machine)."""

import socket

import pytest

pytest.importorskip("fastapi", reason="the dashboard needs its extra: pip install 'sftune[ui]'")
pytest.importorskip("httpx", reason="the test client needs httpx (in the test extra)")
from fastapi.testclient import TestClient  # noqa: E402

from sftune.dashboard.server import free_port, is_local  # noqa: E402


def test_cli_ui_command(tmp_path, monkeypatch, capsys):
    import uvicorn

    from sftune.cli import main

    assert main(["ui", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw, app=app))
    assert main(["ui", str(tmp_path), "--port", "8123"]) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    assert "http://127.0.0.1:8123/" in capsys.readouterr().err and "token" not in seen
    assert main(["ui", str(tmp_path), "--host", "0.0.0.0", "--port", "8124"]) == 0
    assert "?token=" in capsys.readouterr().err.replace("\n", "")  # exposing it always takes a token
    assert TestClient(seen["app"]).get("/api/runs").status_code == 401


def test_loopback_hosts_are_local():
    assert all(is_local(h) for h in ("localhost", "127.0.0.1", "::1", "[::1]", "127.0.0.2"))
    assert not any(is_local(h) for h in ("0.0.0.0", "192.168.1.5", "example.com", "::"))


def test_free_port_prefers_the_given_one_and_falls_back():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        other = free_port("127.0.0.1", taken)
        assert other != taken and other > 0
    assert free_port("127.0.0.1", other) == other  # free again: the preferred port is used
