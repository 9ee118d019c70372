"""Where `make run` listens: loopback only without sign-in, and Streamlit's own settings still apply."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from core.access.bind import check_listen_address, is_loopback
from core.errors import UserError
from tests.server import ROOT, free_port, stop_app, wait_healthy


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.0.3", "::1", "[::1]", "localhost"])
def test_loopback_addresses_are_allowed_without_sign_in(address):
    assert is_loopback(address)
    check_listen_address("none", address)


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "", None, "192.0.2.7", "lab-server.example.org"])
def test_other_addresses_need_a_sign_in(address):
    with pytest.raises(UserError, match="AUTH_MODE"):
        check_listen_address("none", address)
    check_listen_address("password", address)
    check_listen_address("oidc", address)


def serve(env: dict[str, str], log) -> subprocess.Popen:
    """`make run`'s command, with no address or port flag: only the environment and config.toml."""
    return subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "serve.py"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def listening(port: int) -> set[str]:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines()}


def test_make_run_listens_on_loopback_only_and_refuses_a_wider_address(settings, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "APP_HOME": str(settings.app_home),
        "START_WORKER": "0",
        "AUTH_MODE": "none",
        "STREAMLIT_SERVER_PORT": str(port),
    }
    env.pop("STREAMLIT_SERVER_ADDRESS", None)
    with open(tmp_path / "serve.log", "w") as log:
        process = serve(env, log)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", process, log=tmp_path / "serve.log")
            assert listening(port) == {"127.0.0.1"}
        finally:
            stop_app(process)
    out = (tmp_path / "serve.log").read_text()
    assert "External URL" not in out and "Network URL" not in out

    wide = {**env, "STREAMLIT_SERVER_ADDRESS": "0.0.0.0", "STREAMLIT_SERVER_PORT": str(free_port())}
    refused = subprocess.run(
        [sys.executable, "-m", "streamlit", "run", "serve.py"],
        cwd=ROOT,
        env=wide,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert refused.returncode == 2
    assert "Refusing to listen on 0.0.0.0 with AUTH_MODE=none" in refused.stderr
    assert "Set AUTH_MODE=password" in refused.stderr
