"""Generates the protobuf/gRPC modules of the wire contract with grpcio-tools.

Used at build time by setup.py (so a wheel carries modules made by the grpcio-tools of the build
environment) and at run time by kvbuffer._proto when the shipped modules are missing or were made for
another protobuf runtime. Standard library only: setup.py loads this file by path.
"""
from __future__ import annotations

import os
import shutil
import sys

PROTO_REL = os.path.join("kvbuffer", "v1", "attention_service.proto")


def package_dir() -> str:
    """Directory of the kvbuffer package (this file's folder)."""
    return os.path.dirname(os.path.abspath(__file__))


def shipped_proto(pkg_dir: str | None = None) -> str:
    """Path of the copy of the contract that ships inside the package."""
    return os.path.join(pkg_dir or package_dir(), "proto", PROTO_REL)


def repo_proto(pkg_dir: str | None = None) -> str | None:
    """Path of the contract in a source checkout (client/python/kvbuffer -> proto/), if present."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(pkg_dir or package_dir())))
    path = os.path.join(root, "proto", PROTO_REL)
    return path if os.path.isfile(path) else None


def sync_proto(pkg_dir: str | None = None) -> str:
    """Copies the repository's proto into the package when building from a checkout.

    Returns the path of the shipped copy. Raises FileNotFoundError when neither exists.
    """
    dst = shipped_proto(pkg_dir)
    src = repo_proto(pkg_dir)
    if src is not None:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.isfile(dst) or _read(src) != _read(dst):
            shutil.copyfile(src, dst)
    if not os.path.isfile(dst):
        raise FileNotFoundError(f"kvbuffer: wire contract not found at {dst}")
    return dst


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def generate(out_root: str, pkg_dir: str | None = None) -> list[str]:
    """Runs grpc_tools.protoc on the shipped proto, writing kvbuffer/v1/*_pb2*.py under out_root.

    out_root is the folder that holds the `kvbuffer` package (site-packages, build/lib, or a cache
    folder). Also writes the FileDescriptorSet kvbuffer/v1/attention_service.desc, which the loader
    uses when no generated module fits the installed protobuf runtime. Returns the written paths.
    """
    from grpc_tools import protoc  # imported lazily: a build or dev dependency only

    proto = sync_proto(pkg_dir)
    include = os.path.join(pkg_dir or package_dir(), "proto")
    gen_dir = os.path.join(out_root, "kvbuffer", "v1")
    os.makedirs(gen_dir, exist_ok=True)
    init = os.path.join(gen_dir, "__init__.py")
    if not os.path.exists(init):
        with open(init, "w") as f:
            f.write('"""Generated modules of the wire contract kvbuffer.v1."""\n')
    desc = os.path.join(gen_dir, "attention_service.desc")
    args = [
        "grpc_tools.protoc",
        f"--proto_path={include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--descriptor_set_out={desc}",
        proto,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"kvbuffer: grpc_tools.protoc failed ({rc}) on {proto}")
    return [
        os.path.join(gen_dir, "attention_service_pb2.py"),
        os.path.join(gen_dir, "attention_service_pb2_grpc.py"),
        desc,
    ]


if __name__ == "__main__":  # python -m kvbuffer._codegen [OUT_ROOT]
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(package_dir())
    for p in generate(out):
        print(p)
