"""An MLflow tracking server for tests and benchmarks, and a proxy that makes it slow or stalls it.

`MlflowServer` runs `mlflow server` (SQLite store) on 127.0.0.1 in its own process group;
`StallingProxy` sits in front of it (tests/test_tracking.py, benchmarks/critical_path.py).
Never used by training itself.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` in its own process group (the CLI starts uvicorn as a child), so stopping
    it ends exactly the processes it started."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 90.0) -> None:
        env = dict(os.environ)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner / huey workers
        env.pop("MLFLOW_TRACKING_URI", None)
        self.log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server",
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "server-artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("mlflow server exited:\n" + (self.root / "server.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("mlflow server did not answer in time")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        # the uvicorn child shares the group: make sure it is gone too before a restart
        for _ in range(50):
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None
        self.log.close()


class StallingProxy:
    """An HTTP proxy in front of an MLflow server (`target`, or none: every request answered 503)
    that can stall: while stalled, each request is held (counted in `held`) until the stall
    ends, then forwarded, as a server whose event loop is blocked would answer late. A client
    that gave up meanwhile (its request timeout) finds its connection gone; the request is
    still applied, as a real server would. `delay_s`: every request answered that much later
    (a slow server); `down` (`outage(seconds)`): every request answered 503 at once, nothing
    forwarded (a server that is down behind its load balancer); `requests` counts them all."""

    def __init__(self, target: Optional[str], delay_s: float = 0.0):
        self.target = target
        self.released = threading.Event()
        self.released.set()
        self.delay_s = delay_s
        self.down = False
        self.requests = 0
        self.held = 0  # requests that arrived during a stall
        self.answered_in_stall = 0  # responses sent while stalled (must stay 0)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.requests += 1
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                if not proxy.released.is_set():
                    proxy.held += 1
                    proxy.released.wait()
                status, headers, data = 503, {}, b"no upstream"
                if proxy.target is not None and not proxy.down:
                    req = urllib.request.Request(
                        proxy.target + self.path, data=body if body else None, method=self.command,
                        headers={k: v for k, v in self.headers.items()
                                 if k.lower() not in ("host", "connection", "content-length")})
                    try:
                        with urllib.request.urlopen(req, timeout=60) as r:
                            status, headers, data = r.status, dict(r.headers), r.read()
                    except urllib.error.HTTPError as e:
                        status, headers, data = e.code, dict(e.headers), e.read()
                if not proxy.released.is_set():
                    proxy.answered_in_stall += 1
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client timed out and left

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _any

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stall(self, seconds: float) -> None:
        """Hold every request from now on for `seconds` (inf: until `release`)."""
        self.released.clear()
        if seconds != float("inf"):
            threading.Timer(seconds, self.released.set).start()

    def outage(self, seconds: float) -> None:
        """Answer every request 503 for `seconds`, forwarding nothing."""
        self.down = True

        def up():
            self.down = False
        threading.Timer(seconds, up).start()

    @property
    def stalled(self) -> bool:
        return not self.released.is_set()

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()
