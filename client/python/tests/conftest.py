"""Fixtures: live kvbuffer-server processes (CPU backend, tiny model, ephemeral ports).

The binary comes from $KVBUFFER_SERVER_BIN, else the newest build*/bin/kvbuffer-server of the
checkout. Without one, every test that needs a server is skipped with that message.
"""
from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

# Small pools and a short flush interval so tests cross flush boundaries and fill pools quickly.
DEFAULT_ARGS = [
    "--backend=cpu", "--model=tiny", "--host=127.0.0.1", "--port=0",
    "--flush_interval=4", "--stateless_limit=8", "--max_drafts=4", "--page_tokens=4",
    "--max_sequences=24", "--state_slots=16", "--buffer_pages=96",
]


def find_server_binary() -> str | None:
    env = os.environ.get("KVBUFFER_SERVER_BIN")
    if env:
        return env if os.access(env, os.X_OK) else None
    found = [p for p in glob.glob(os.path.join(REPO, "build*", "bin", "kvbuffer-server"))
             if os.access(p, os.X_OK)]
    return max(found, key=os.path.getmtime) if found else None


_HELP: dict[str, str] = {}


def server_flags(binary: str) -> str:
    """--helpfull text (to learn which optional flags this build has)."""
    if binary not in _HELP:
        try:
            r = subprocess.run([binary, "--helpfull"], capture_output=True, text=True, timeout=20)
            _HELP[binary] = r.stdout + r.stderr
        except (OSError, subprocess.TimeoutExpired):
            _HELP[binary] = ""
    return _HELP[binary]


class ServerProcess:
    """One kvbuffer-server on 127.0.0.1 with an ephemeral port (and metrics port if supported)."""

    def __init__(self, binary: str, extra_args=(), metrics: bool = True):
        self.binary = binary
        args = list(DEFAULT_ARGS) + list(extra_args)
        self.metrics_url = None
        self.health_address = None  # the plaintext health-only port (--health_port), if any
        if metrics and "metrics_port" in server_flags(binary):
            args.append("--metrics_port=0")
            if "metrics_host" in server_flags(binary):
                args.append("--metrics_host=127.0.0.1")
        self.args = args
        self.lines: list[str] = []
        self.proc = subprocess.Popen([binary] + args, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.address = None
        ready = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                m = re.match(r"listening on (\S+:\d+)", line)
                if m and self.address is None:
                    self.address = m.group(1)
                    ready.set()
                m = re.match(r"health on (\S+:\d+)", line)
                if m:
                    self.health_address = m.group(1)
                m = re.search(r"metrics (?:listening )?on (?:http://)?(\S+:\d+)", line)
                if m:
                    self.metrics_url = f"http://{m.group(1)}/metrics"
            ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        ready.wait(60)
        if self.address is None:
            self.stop()
            raise RuntimeError("kvbuffer-server did not start:\n" + "\n".join(self.lines[-30:]))
        # The metrics line may follow the listening line.
        deadline = time.time() + 2
        while metrics and "metrics_port" in server_flags(binary) and self.metrics_url is None \
                and time.time() < deadline:
            time.sleep(0.05)
        while any(a.startswith("--health_port=") for a in args) and self.health_address is None \
                and time.time() < deadline:
            time.sleep(0.05)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> None:
        """Abrupt death (SIGKILL): the replica goes away without draining."""
        self.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def server_bin() -> str:
    b = find_server_binary()
    if b is None:
        pytest.skip("kvbuffer-server binary not found: build it (scripts/build.sh) or set "
                    "KVBUFFER_SERVER_BIN=/path/to/kvbuffer-server")
    return b


@pytest.fixture(scope="module")
def server(server_bin):
    s = ServerProcess(server_bin)
    yield s
    s.stop()


@pytest.fixture
def client(server):
    import kvbuffer

    with kvbuffer.Client(server.address, timeout=30, retries=2) as c:
        yield c


@pytest.fixture
def start_server(server_bin):
    """Factory for extra servers in one test; all are stopped at the end."""
    started: list[ServerProcess] = []

    def start(extra_args=(), metrics=False):
        s = ServerProcess(server_bin, extra_args, metrics=metrics)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
