"""kvbuffer-cli against a live server."""
import subprocess
import sys

import pytest

from kvbuffer import cli

pytestmark = pytest.mark.server


def run(capsys, *args):
    rc = cli.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_info(server, capsys):
    rc, out, _ = run(capsys, "--server", server.address, "info")
    assert rc == 0 and "tiny" in out and "backend cpu" in out and "C=4" in out
    rc, out, _ = run(capsys, "--server", server.address, "info", "--json")
    assert rc == 0 and '"backend": "cpu"' in out


def test_health(server, capsys):
    rc, out, _ = run(capsys, "--server", server.address, "health")
    assert rc == 0 and out.count("SERVING") == 3
    rc, out, _ = run(capsys, "--server", server.address, "health", "--service", "nope")
    assert rc == 1 and "SERVICE_UNKNOWN" in out


def test_capacity(server, capsys):
    rc, out, _ = run(capsys, "--server", server.address, "capacity", "--length", "1000",
                     "--drafts", "2")
    assert rc == 0 and "kvbuffer bytes/sequence" in out and "sequences that fit now" in out


def test_stats(server, capsys):
    if server.metrics_url is None:
        pytest.skip("this kvbuffer-server build has no --metrics_port")
    rc, out, _ = run(capsys, "stats", "--metrics", server.metrics_url)
    assert rc == 0 and "active sequences" in out and "GetServerInfo" in out


def test_unreachable_exit_code(capsys):
    rc, _, err = run(capsys, "--server", "127.0.0.1:1", "--timeout", "2", "info")
    assert rc == 2 and "UNAVAILABLE" in err


def test_entry_point_module():
    r = subprocess.run([sys.executable, "-m", "kvbuffer", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "capacity" in r.stdout
