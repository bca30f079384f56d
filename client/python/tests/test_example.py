"""The SGLang-style example runs against a live server and matches the fp64 reference."""
import os
import runpy

import pytest

pytestmark = pytest.mark.server
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                       "sglang_style_layer.py")


@pytest.mark.parametrize("mode", [[], ["--unary"]])
def test_sglang_style_example(server, capsys, mode):
    mod = runpy.run_path(EXAMPLE)
    rc = mod["main"](["--server", server.address, "--check", "--steps", "5"] + mode)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "max relative error" in out


def test_sglang_style_example_routed(start_server, capsys):
    servers = [start_server() for _ in range(2)]
    mod = runpy.run_path(EXAMPLE)
    rc = mod["main"](["--replicas", ",".join(s.address for s in servers), "--check"])
    assert rc == 0, capsys.readouterr().out
