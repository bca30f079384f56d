"""The protobuf message classes of the wire contract kvbuffer.v1, whatever protobuf is installed.

Order of preference:
1. the modules generated at build/install time (kvbuffer/v1/attention_service_pb2.py);
2. if they are missing or were made for another protobuf runtime and grpcio-tools is importable,
   modules regenerated now (into the package when writable, else a per-user cache folder);
3. message classes built at run time from the shipped FileDescriptorSet (attention_service.desc),
   which works with any protobuf runtime >= 3.20 because it involves no generated code.
The gRPC method handles are made in kvbuffer.client from these classes (no generated gRPC stub is
needed, so no grpcio version check applies either).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
import types

from kvbuffer import _codegen

_MODULE = "kvbuffer.v1.attention_service_pb2"
_MESSAGES = (
    "Tensor", "ModelShapes", "BufferSettings", "CapacityEstimate", "Capacity", "Counters",
    "CapacityQuery", "GetServerInfoRequest", "GetServerInfoResponse", "OpenSequencesRequest",
    "OpenSequencesResponse", "CloseSequencesRequest", "CloseSequencesResponse", "SequenceTokens",
    "PrefillRequest", "DecodeStepRequest", "VerifyDraftsRequest", "LayerOutput", "CommitItem",
    "CommitDraftsRequest", "CommitDraftsResponse", "FlushRequest", "FlushResponse",
    "StreamRequest", "StreamResponse",
)

# How the messages were obtained: "generated", "regenerated:<dir>" or "descriptor".
source = ""
_errors: list[str] = []


def _import_generated():
    sys.modules.pop(_MODULE, None)
    importlib.invalidate_caches()
    return importlib.import_module(_MODULE)


def _regenerate():
    try:
        import grpc_tools  # noqa: F401
    except ImportError as e:
        raise RuntimeError("grpcio-tools is not installed") from e
    pkg = _codegen.package_dir()
    tmp = tempfile.mkdtemp(prefix="kvbuffer-codegen-")
    try:
        _codegen.generate(tmp, pkg)
        made = os.path.join(tmp, "kvbuffer", "v1")
        target_root = os.path.dirname(pkg)
        target = os.path.join(pkg, "v1")
        if not os.access(target, os.W_OK):
            cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            target_root = os.path.join(cache, "kvbuffer", "codegen")
            target = os.path.join(target_root, "kvbuffer", "v1")
            os.makedirs(target, exist_ok=True)
        for name in ("attention_service_pb2.py", "attention_service_pb2_grpc.py",
                     "attention_service.desc"):
            # Atomic per file, so concurrent first imports in several processes stay safe.
            part = os.path.join(target, f".{name}.{os.getpid()}")
            shutil.copyfile(os.path.join(made, name), part)
            os.replace(part, os.path.join(target, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if target == os.path.join(pkg, "v1"):
        return _import_generated(), f"regenerated:{target}"
    path = os.path.join(target, "attention_service_pb2.py")
    spec = importlib.util.spec_from_file_location(_MODULE, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(_MODULE, None)
        raise
    return mod, f"regenerated:{target}"


def _find_desc() -> str | None:
    candidates = [os.path.join(_codegen.package_dir(), "v1", "attention_service.desc")]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    candidates.append(os.path.join(cache, "kvbuffer", "codegen", "kvbuffer", "v1",
                                   "attention_service.desc"))
    for c in candidates:
        if os.path.isfile(c):
            return c
    return None


def _from_descriptor():
    from google.protobuf import descriptor_pb2, descriptor_pool

    path = _find_desc()
    if path is None:
        raise RuntimeError("no attention_service.desc shipped")
    with open(path, "rb") as f:
        fds = descriptor_pb2.FileDescriptorSet.FromString(f.read())
    pool = descriptor_pool.DescriptorPool()  # private: never clashes with other loaded modules
    for fd in fds.file:
        pool.Add(fd)
    try:
        from google.protobuf.message_factory import GetMessageClass
    except ImportError:  # protobuf < 4.21
        from google.protobuf import message_factory

        _factory = message_factory.MessageFactory(pool)
        GetMessageClass = _factory.GetPrototype  # noqa: N806
    ns = types.SimpleNamespace()
    for name in _MESSAGES:
        setattr(ns, name, GetMessageClass(pool.FindMessageTypeByName(f"kvbuffer.v1.{name}")))
    dtype = pool.FindEnumTypeByName("kvbuffer.v1.DType")
    for v in dtype.values:
        setattr(ns, v.name, v.number)
    ns.DType = types.SimpleNamespace(Name=lambda n: dtype.values_by_number[n].name,
                                     Value=lambda s: dtype.values_by_name[s].number)
    return ns


def _load():
    global source
    try:
        mod = _import_generated()
        source = "generated"
        return mod
    except Exception as e:  # missing, or made for another protobuf runtime
        _errors.append(f"generated: {type(e).__name__}: {e}")
    try:
        mod, source = _regenerate()
        return mod
    except Exception as e:
        _errors.append(f"regenerate: {type(e).__name__}: {e}")
    try:
        ns = _from_descriptor()
        source = "descriptor"
        return ns
    except Exception as e:
        _errors.append(f"descriptor: {type(e).__name__}: {e}")
    raise ImportError(
        "kvbuffer: cannot load the kvbuffer.v1 protobuf messages; reinstall the package "
        "(pip install kvbuffer) or install grpcio-tools so they can be generated. Tried: "
        + "; ".join(_errors))


pb = _load()
