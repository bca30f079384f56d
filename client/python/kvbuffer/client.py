"""Python client of kvbuffer.v1.AttentionService: unary calls and a Stream session.

    import kvbuffer
    with kvbuffer.Client("127.0.0.1:50051") as c:
        info = c.get_server_info()
        c.open_sequences([7])
        r = c.prefill(0, [(7, 0, 12)], qkv, a, b)        # (id, position, num_tokens)
        r.output                                        # numpy [12, HV, V] (torch in -> torch out)

Every per-layer call carries each sequence's expected position on that layer, so a call that failed
with UNAVAILABLE or DEADLINE_EXCEEDED is retried with the same request: the server answers a
replay without appending twice (exactly-once per token). Other errors raise KVBufferError with the
gRPC status code (NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION, RESOURCE_EXHAUSTED,
OUT_OF_RANGE, UNAVAILABLE, INTERNAL, ...).
"""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import grpc

from kvbuffer import tensors
from kvbuffer._proto import pb

SERVICE = "kvbuffer.v1.AttentionService"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_CODE_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}

_UNARY = {
    # python name: (RPC, request class name, response class name)
    "get_server_info": ("GetServerInfo", "GetServerInfoRequest", "GetServerInfoResponse"),
    "open_sequences": ("OpenSequences", "OpenSequencesRequest", "OpenSequencesResponse"),
    "close_sequences": ("CloseSequences", "CloseSequencesRequest", "CloseSequencesResponse"),
    "prefill": ("Prefill", "PrefillRequest", "LayerOutput"),
    "decode_step": ("DecodeStep", "DecodeStepRequest", "LayerOutput"),
    "verify_drafts": ("VerifyDrafts", "VerifyDraftsRequest", "LayerOutput"),
    "commit_drafts": ("CommitDrafts", "CommitDraftsRequest", "CommitDraftsResponse"),
    "flush": ("Flush", "FlushRequest", "FlushResponse"),
}


class KVBufferError(Exception):
    """A call failed: `code` is the grpc.StatusCode, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str, rpc: str = "", target: str = ""):
        self.code = code
        self.details = details
        self.rpc = rpc
        self.target = target
        where = f" {rpc}" if rpc else ""
        at = f" at {target}" if target else ""
        super().__init__(f"{code.name}{where}{at}: {details}")


@dataclass(frozen=True)
class Seq:
    """One sequence's part of a per-layer call (proto SequenceTokens)."""
    id: int
    position: int
    num_tokens: int = 1


@dataclass
class LayerResult:
    """Outputs of Prefill/DecodeStep/VerifyDrafts: output [total_tokens, HV, V]."""
    output: Any
    replayed: bool
    positions: list[int]


def _as_seqs(sequences: Iterable[Any], default_tokens: int | None) -> list[Seq]:
    out = []
    for s in sequences:
        if isinstance(s, Seq):
            out.append(s)
        elif hasattr(s, "id") and hasattr(s, "position"):
            out.append(Seq(int(s.id), int(s.position), int(getattr(s, "num_tokens", 1) or 1)))
        else:
            t = tuple(s)
            if len(t) == 3:
                out.append(Seq(int(t[0]), int(t[1]), int(t[2])))
            elif len(t) == 2:
                if default_tokens is None:
                    raise ValueError("give (id, position, num_tokens) for each sequence")
                out.append(Seq(int(t[0]), int(t[1]), default_tokens))
            else:
                raise ValueError(f"sequence spec {s!r}: want (id, position[, num_tokens])")
    return out


def _rows(x: Any) -> int:
    shape = tuple(x.shape)
    return int(shape[0]) if shape else 1


def layer_request(cls_name: str, layer: int, sequences: Iterable[Any], qkv: Any, a: Any, b: Any,
                  *, input_dtype: Any = None, output_dtype: Any = None, default_tokens=None):
    """Builds a PrefillRequest/DecodeStepRequest/VerifyDraftsRequest. qkv is reshaped to
    [total_tokens, channels], a and b to [total_tokens, HV]."""
    seqs = list(sequences)
    if default_tokens is None and len(seqs) == 1:
        default_tokens = _rows(qkv)  # one sequence: its tokens are qkv's rows
    seqs = _as_seqs(seqs, default_tokens)
    total = sum(s.num_tokens for s in seqs)
    req = getattr(pb, cls_name)()
    req.layer = int(layer)
    for s in seqs:
        item = req.sequences.add()
        item.id, item.position, item.num_tokens = s.id, s.position, s.num_tokens
    arr, dt = tensors.to_numpy(qkv, input_dtype)
    for field, x in (("qkv", arr), ("a", a), ("b", b)):
        x, _ = tensors.to_numpy(x, dt)
        if total and x.size % total:
            raise ValueError(f"{field} has {x.size} values, not a multiple of {total} tokens")
        getattr(req, field).CopyFrom(
            tensors.tensor_from_array(x, dt, (total, x.size // max(total, 1))))
    req.output_dtype = tensors.dtype_enum(output_dtype)
    return req


class _Ops:
    """The typed operations, shared by Client (unary) and StreamSession; `_invoke(name, request,
    timeout)` sends one call and returns its response message."""

    def _invoke(self, name: str, request, timeout):  # pragma: no cover - abstract
        raise NotImplementedError

    def _result(self, out, torch_out: bool, bf16_bits: bool = False) -> LayerResult:
        if torch_out:
            arr = tensors.tensor_to_torch(out.output)
        else:
            arr = tensors.tensor_to_numpy(out.output, as_bf16_bits=bf16_bits)
        return LayerResult(arr, bool(out.replayed), [int(p) for p in out.positions])

    def get_server_info(self, capacity_queries: Sequence[tuple[int, int]] = (), *,
                        timeout: float | None = None):
        """GetServerInfoResponse: model shapes, buffer settings, capacity (with an estimate per
        (length, drafts) query), counters, features, version."""
        req = pb.GetServerInfoRequest()
        for length, drafts in capacity_queries:
            q = req.capacity_queries.add()
            q.length, q.drafts = int(length), int(drafts)
        return self._invoke("get_server_info", req, timeout)

    def open_sequences(self, ids: Iterable[int], *, timeout: float | None = None) -> None:
        """Opens sequences (ALREADY_EXISTS if one is open; RESOURCE_EXHAUSTED if full)."""
        self._invoke("open_sequences", pb.OpenSequencesRequest(ids=[int(i) for i in ids]), timeout)

    def close_sequences(self, ids: Iterable[int], *, timeout: float | None = None) -> None:
        """Closes sequences and frees what they hold (NOT_FOUND if one is unknown)."""
        self._invoke("close_sequences", pb.CloseSequencesRequest(ids=[int(i) for i in ids]),
                     timeout)

    def _layer(self, name, cls, layer, sequences, qkv, a, b, input_dtype, output_dtype,
               timeout, as_torch, bf16_bits, default_tokens):
        req = layer_request(cls, layer, sequences, qkv, a, b, input_dtype=input_dtype,
                            output_dtype=output_dtype, default_tokens=default_tokens)
        torch_out = tensors.is_torch(qkv) if as_torch is None else as_torch
        return self._result(self._invoke(name, req, timeout), torch_out, bf16_bits)

    def prefill(self, layer: int, sequences: Iterable[Any], qkv, a, b, *, input_dtype=None,
                output_dtype=None, timeout: float | None = None, as_torch: bool | None = None,
                bf16_bits: bool = False) -> LayerResult:
        """T_i >= 1 committed tokens per sequence; sequences are (id, position, num_tokens)."""
        return self._layer("prefill", "PrefillRequest", layer, sequences, qkv, a, b, input_dtype,
                           output_dtype, timeout, as_torch, bf16_bits, None)

    def decode_step(self, layer: int, sequences: Iterable[Any], qkv, a, b, *, input_dtype=None,
                    output_dtype=None, timeout: float | None = None, as_torch: bool | None = None,
                    bf16_bits: bool = False) -> LayerResult:
        """One committed token per sequence; sequences are (id, position)."""
        return self._layer("decode_step", "DecodeStepRequest", layer, sequences, qkv, a, b,
                           input_dtype, output_dtype, timeout, as_torch, bf16_bits, 1)

    def verify_drafts(self, layer: int, sequences: Iterable[Any], qkv, a, b, *, input_dtype=None,
                      output_dtype=None, timeout: float | None = None,
                      as_torch: bool | None = None, bf16_bits: bool = False) -> LayerResult:
        """1..max_drafts tentative tokens per sequence; sequences are (id, position, drafts)."""
        return self._layer("verify_drafts", "VerifyDraftsRequest", layer, sequences, qkv, a, b,
                           input_dtype, output_dtype, timeout, as_torch, bf16_bits, None)

    def commit_drafts(self, items: Iterable[tuple[int, int, int]], *,
                      timeout: float | None = None) -> None:
        """Keeps the first `accepted` drafts of each (id, position, accepted) on every layer."""
        req = pb.CommitDraftsRequest()
        for sid, pos, acc in items:
            it = req.items.add()
            it.id, it.position, it.accepted = int(sid), int(pos), int(acc)
        self._invoke("commit_drafts", req, timeout)

    def flush(self, ids: Iterable[int], *, timeout: float | None = None) -> None:
        """Folds the sequences' buffers into their states now, on every layer."""
        self._invoke("flush", pb.FlushRequest(ids=[int(i) for i in ids]), timeout)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path}: {e.strerror or e}") from None


def read_token_file(path: str) -> str:
    """The bearer token in `path`: its first line, without surrounding white space."""
    lines = _read(path, "token file").decode("utf-8", "replace").splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise ValueError(f"token file: {path} holds no token on its first line")
    return token


def tls_credentials(ca: str | None = None, cert: str | None = None,
                    key: str | None = None) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files: `ca` the CA(s) the server certificate must chain to
    (None: the system roots); `cert` and `key` a client certificate and its key (mutual TLS).
    ValueError naming a file that cannot be read, or a certificate without its key."""
    if (cert is None) != (key is None):
        raise ValueError("give both tls_cert and tls_key (mutual TLS), or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "tls_ca") if ca else None,
        private_key=_read(key, "tls_key") if key else None,
        certificate_chain=_read(cert, "tls_cert") if cert else None)


class Client(_Ops):
    """Unary client of one server. Thread-safe (one gRPC channel)."""

    def __init__(self, target: str, *, timeout: float | None = 30.0, retries: int = 3,
                 backoff: float = 0.05, metadata: Sequence[tuple[str, str]] = (),
                 token: str | None = None, token_file: str | None = None, tls: bool = False,
                 tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, tls_server_name: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, Any]] = (), channel: grpc.Channel | None = None):
        """target "host:port"; timeout: default deadline of each attempt (seconds, None = none);
        retries: extra attempts on UNAVAILABLE/DEADLINE_EXCEEDED.

        Security (docs/reliability.md §5): token / token_file: bearer token sent as
        `authorization: Bearer <token>` on every call (token_file: its first line). tls: connect
        with TLS, trusting the system roots, or tls_ca (PEM; implies tls); tls_cert + tls_key: a
        client certificate for mutual TLS (implies tls); tls_server_name: the name the server
        certificate must carry when it is not the target's host. credentials: ready-made
        grpc.ChannelCredentials instead of the tls_* files."""
        self.target = target
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.backoff = backoff
        if token and token_file:
            raise ValueError("give token or token_file, not both")
        if token_file:
            token = read_token_file(token_file)
        md = list(metadata)
        if token:
            md.append(("authorization", f"Bearer {token}"))
        self.metadata = tuple(md)
        opts = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        if tls_server_name:
            opts.append(("grpc.ssl_target_name_override", tls_server_name))
        opts += list(options)
        if credentials is None and (tls or tls_ca or tls_cert or tls_key):
            credentials = tls_credentials(tls_ca, tls_cert, tls_key)
        self.secure = channel is None and credentials is not None
        if channel is not None:
            self._channel = channel
        elif credentials is not None:
            self._channel = grpc.secure_channel(target, credentials, options=opts)
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        self._methods = {}
        for name, (rpc, req, resp) in _UNARY.items():
            self._methods[name] = self._channel.unary_unary(
                f"/{SERVICE}/{rpc}",
                request_serializer=getattr(pb, req).SerializeToString,
                response_deserializer=getattr(pb, resp).FromString)
        self._stream = self._channel.stream_stream(
            f"/{SERVICE}/Stream", request_serializer=pb.StreamRequest.SerializeToString,
            response_deserializer=pb.StreamResponse.FromString)
        self._health = self._channel.unary_unary(
            HEALTH_CHECK, request_serializer=_health_request, response_deserializer=_health_status)

    # -- plumbing ---------------------------------------------------------------------------
    def _invoke(self, name, request, timeout):
        rpc = _UNARY[name][0]
        deadline = self.timeout if timeout is None else timeout
        attempt = 0
        while True:
            try:
                return self._methods[name](request, timeout=deadline, metadata=self.metadata)
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
                details = e.details() if hasattr(e, "details") else str(e)
                if attempt > 0:
                    # The first attempt may have been applied before its answer was lost.
                    if name == "open_sequences" and code == grpc.StatusCode.ALREADY_EXISTS:
                        return pb.OpenSequencesResponse()
                    if name == "close_sequences" and code == grpc.StatusCode.NOT_FOUND:
                        return pb.CloseSequencesResponse()
                if code in RETRYABLE and attempt < self.retries:
                    time.sleep(self.backoff * (2 ** attempt))
                    attempt += 1
                    continue
                raise KVBufferError(code, details or "", rpc, self.target) from None

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """grpc.health.v1 Check: "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN"."""
        try:
            return self._health(service, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise KVBufferError(e.code(), e.details() or "", "Health/Check", self.target) from None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Blocks until the channel connects (raises KVBufferError UNAVAILABLE on time-out)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise KVBufferError(grpc.StatusCode.UNAVAILABLE, "not reachable", "connect",
                                self.target) from None

    def stream(self, *, timeout: float | None = None, retries: int | None = None) -> "StreamSession":
        """Opens a Stream session (use as a context manager)."""
        return StreamSession(self, timeout=timeout,
                             retries=self.retries if retries is None else retries)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# grpc.health.v1 messages are encoded by hand (field 1 only) so no health stubs are needed and no
# second copy of health.proto lands in the default descriptor pool.
_HEALTH_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _health_request(service: str) -> bytes:
    data = service.encode()
    return (b"\x0a" + _varint(len(data)) + data) if data else b""


def _health_status(data: bytes) -> str:
    i, status = 0, 0
    while i < len(data):
        key, shift = 0, 0
        while True:
            b = data[i]
            i += 1
            key |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        if key & 7 != 0:  # HealthCheckResponse has one varint field
            break
        val, shift = 0, 0
        while True:
            b = data[i]
            i += 1
            val |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        if key >> 3 == 1:
            status = val
    return _HEALTH_NAMES.get(status, f"STATUS_{status}")


_END = object()
_STREAM_FIELD = {
    "get_server_info": "get_server_info", "open_sequences": "open_sequences",
    "close_sequences": "close_sequences", "prefill": "prefill", "decode_step": "decode_step",
    "verify_drafts": "verify_drafts", "commit_drafts": "commit_drafts", "flush": "flush",
}


class StreamSession(_Ops):
    """The operations on one bidirectional Stream, answered in order. Each method sends its call
    and waits for its answer; `submit`/`wait` pipeline several calls. Not thread-safe: one session
    per worker thread. If the stream breaks with UNAVAILABLE, a new one is opened and the call
    resent (safe: calls carry positions)."""

    def __init__(self, client: Client, *, timeout: float | None = None, retries: int = 3):
        self._client = client
        self._timeout = timeout
        self._retries = retries
        self._next_id = 1
        self._pending: dict[int, tuple[str, Any]] = {}
        self._done: dict[int, Any] = {}
        self._open()

    def _open(self):
        self._q: queue.Queue = queue.Queue()
        q = self._q

        def requests():
            while True:
                item = q.get()
                if item is _END:
                    return
                yield item

        self._call = self._client._stream(requests(), timeout=self._timeout,
                                          metadata=self._client.metadata)
        self._closed = False

    def submit(self, name: str, request) -> int:
        """Sends one call (name as the method, e.g. "decode_step"); returns its request id."""
        rid = self._next_id
        self._next_id += 1
        self._pending[rid] = (name, request)
        self._send(rid, name, request)
        return rid

    def _send(self, rid, name, request):
        sr = pb.StreamRequest(request_id=rid)
        getattr(sr, _STREAM_FIELD[name]).CopyFrom(request)
        self._q.put(sr)

    def wait(self, rid: int):
        """The response message of request `rid` (raises KVBufferError if it failed)."""
        attempt = 0
        while rid not in self._done:
            try:
                resp = next(self._call)
            except StopIteration:
                raise KVBufferError(grpc.StatusCode.UNAVAILABLE, "stream ended", "Stream",
                                    self._client.target) from None
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAVAILABLE and attempt < self._retries:
                    attempt += 1
                    time.sleep(self._client.backoff * (2 ** (attempt - 1)))
                    self._q.put(_END)  # ends the broken stream's request iterator
                    self._open()  # resend everything unanswered, in order, on a new stream
                    for r in sorted(self._pending):
                        self._send(r, *self._pending[r])
                    continue
                raise KVBufferError(code, e.details() or "", "Stream", self._client.target) from None
            self._done[resp.request_id] = resp
            self._pending.pop(resp.request_id, None)
        resp = self._done.pop(rid)
        if resp.status_code != 0:
            code = _CODE_BY_VALUE.get(resp.status_code, grpc.StatusCode.UNKNOWN)
            raise KVBufferError(code, resp.status_message, "Stream", self._client.target)
        which = resp.WhichOneof("result")
        return getattr(resp, which) if which else None

    def _invoke(self, name, request, timeout):
        return self.wait(self.submit(name, request))

    def close(self) -> None:
        """Half-closes the stream and waits for the server to end it."""
        if self._closed:
            return
        self._closed = True
        self._q.put(_END)
        try:
            for _ in self._call:
                pass
        except grpc.RpcError:
            pass

    def cancel(self) -> None:
        self._closed = True
        self._call.cancel()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.cancel()
