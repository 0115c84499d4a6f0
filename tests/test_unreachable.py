"""A Ray cluster or MLflow tracking server that cannot be reached is an input problem: one line naming the
address and what to check, exit 2, nothing written, within a bounded time (closed local ports: no waiting)."""
from __future__ import annotations

import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from bench.__main__ import main
from bench.errors import BenchError
from bench.tracking import HTTP_RETRY_DEFAULTS, _quiet_mlflow, check_server

BOUND_S = 60  # Ray's own client would retry an absent cluster for minutes


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_mini(tmp_path, capsys, *extra: str) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    code = main(["run", "mini", "--results", str(tmp_path / "results"), "--no-progress", *extra])
    return code, capsys.readouterr().err.strip(), time.perf_counter() - t0


def test_an_unreachable_ray_cluster_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    address = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    code, err, seconds = run_mini(tmp_path, capsys)  # the default executor: Ray
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"Ray cluster {address} (RAY_ADDRESS) cannot be reached" in err and "`ray status`" in err
    assert not (tmp_path / "results").exists() and seconds < BOUND_S


def test_an_unreachable_tracking_server_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, err, seconds = run_mini(tmp_path, capsys, "--executor", "local")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"MLflow tracking server {uri} cannot be reached" in err and f"{uri}/health" in err
    assert not (tmp_path / "results").exists() and seconds < BOUND_S


def test_a_server_that_answers_passes_whatever_it_answers():
    """Behind MLflow's basic-auth app ``/health`` may answer 401: the server is there; a proxy's 502 is not."""

    status = {"code": 401}

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status["code"])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_server(f"http://127.0.0.1:{server.server_port}")
        status["code"] = 502  # a proxy whose server behind it is down
        with pytest.raises(BenchError, match="HTTP 502"):
            check_server(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    with pytest.raises(BenchError, match="cannot be reached"):
        check_server(f"http://127.0.0.1:{closed_port()}")
    check_server("sqlite:////nowhere/mlflow.db")  # not a server: nothing to probe


def test_the_tracking_client_gives_up_within_a_minute_unless_asked_for_more(monkeypatch):
    for key in HTTP_RETRY_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")  # the user's own setting wins
    _quiet_mlflow()
    timeout, retries = int(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]), 3
    factor = int(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    backoff = sum(factor * 2 ** (k - 1) + 1 for k in range(2, retries + 1))  # urllib3: none after the 1st error
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"
    assert int(HTTP_RETRY_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) == retries
    assert (retries + 1) * timeout + backoff < 60
