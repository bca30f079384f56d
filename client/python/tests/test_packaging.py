"""The package ships the proto, generates stubs at build time, and loads them any way it can."""
import glob
import os
import subprocess
import sys
import zipfile

import pytest

import kvbuffer
from kvbuffer import _proto

PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_messages_loaded():
    assert _proto.source in ("generated", "descriptor") or _proto.source.startswith("regenerated")
    req = kvbuffer.pb.PrefillRequest(layer=1)
    assert req.layer == 1


def test_descriptor_fallback_is_wire_compatible():
    ns = _proto._from_descriptor()
    a = kvbuffer.pb.DecodeStepRequest(layer=3)
    s = a.sequences.add()
    s.id, s.position, s.num_tokens = 7, 11, 1
    a.qkv.dtype = kvbuffer.pb.BF16
    a.qkv.shape.extend([1, 4])
    a.qkv.data = b"\x01\x02" * 4
    b = ns.DecodeStepRequest.FromString(a.SerializeToString())
    assert b.sequences[0].position == 11 and b.qkv.dtype == ns.BF16 == 3
    assert b.SerializeToString() == a.SerializeToString()


def test_wheel_contains_proto_and_generated_modules(tmp_path):
    pytest.importorskip("grpc_tools")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path), PKG_ROOT], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = glob.glob(str(tmp_path / "kvbuffer-*.whl"))[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    for want in ("kvbuffer/proto/kvbuffer/v1/attention_service.proto",
                 "kvbuffer/v1/attention_service_pb2.py", "kvbuffer/v1/attention_service_pb2_grpc.py",
                 "kvbuffer/v1/attention_service.desc", "kvbuffer/client.py", "kvbuffer/cli.py"):
        assert want in names, f"{want} missing from {os.path.basename(wheel)}"
    assert any(n.endswith("entry_points.txt") for n in names)
