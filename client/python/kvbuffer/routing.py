"""Routing past one host: consistent hashing of sequence ids over replicas.

A sequence's state and buffer live on one replica, so every call for it must go there. The ring
places `vnodes` points per replica; a sequence id goes to the replica owning the first point at or
after its hash (wrapping around). Adding or removing a replica moves only the sequences whose
points it gains or loses (about 1/N of them); all others keep their replica.

The hashing is the contract shared with the C++ router (client/cpp/replica_router.h) so workers in
both languages agree:
    point(replica, i) = mix64(fnv1a64(replica) + (i + 1) * 0x9E3779B97F4A7C15)   i = 0..vnodes-1
    key(id)           = mix64(id + 0x9E3779B97F4A7C15)
    mix64             = the SplitMix64 finalizer; all arithmetic mod 2^64
Replicas are identified by their address string exactly as given ("host:port").

Replica lists come from a list, from StatefulSet pod DNS names (stable across pod restarts:
statefulset_addresses), or from a headless Service name resolved to A/AAAA records (resolve_dns;
call RoutedClient.refresh() to follow scaling).
"""
from __future__ import annotations

import bisect
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Sequence

import numpy as np

from kvbuffer import tensors
from kvbuffer.client import Client, KVBufferError, LayerResult, _as_seqs, _rows

M64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
DEFAULT_VNODES = 160


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h ^= byte
        h = (h * 0x100000001B3) & M64
    return h


def mix64(z: int) -> int:
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def key_hash(seq_id: int) -> int:
    return mix64((int(seq_id) + GAMMA) & M64)


def replica_points(replica: str, vnodes: int = DEFAULT_VNODES) -> list[int]:
    base = fnv1a64(replica.encode())
    return [mix64((base + (i + 1) * GAMMA) & M64) for i in range(vnodes)]


class HashRing:
    """Consistent-hash ring of replica names with virtual nodes. Not thread-safe by itself
    (RoutedClient guards it)."""

    def __init__(self, replicas: Iterable[str] = (), vnodes: int = DEFAULT_VNODES):
        if vnodes < 1:
            raise ValueError("vnodes must be >= 1")
        self.vnodes = vnodes
        self._replicas: set[str] = set()
        self._points: list[tuple[int, str]] = []
        self._keys: list[int] = []
        for r in replicas:
            self.add(r)

    @property
    def replicas(self) -> list[str]:
        return sorted(self._replicas)

    def __len__(self) -> int:
        return len(self._replicas)

    def __contains__(self, replica: str) -> bool:
        return replica in self._replicas

    def _rebuild(self):
        pts = [(p, r) for r in self._replicas for p in replica_points(r, self.vnodes)]
        pts.sort()
        self._points = pts
        self._keys = [p for p, _ in pts]

    def add(self, replica: str) -> None:
        if replica not in self._replicas:
            self._replicas.add(replica)
            self._rebuild()

    def remove(self, replica: str) -> None:
        if replica in self._replicas:
            self._replicas.discard(replica)
            self._rebuild()

    def set_replicas(self, replicas: Iterable[str]) -> None:
        new = set(replicas)
        if new != self._replicas:
            self._replicas = new
            self._rebuild()

    def route(self, seq_id: int) -> str:
        """The replica that owns `seq_id` (ValueError if the ring is empty)."""
        if not self._points:
            raise ValueError("no replicas")
        i = bisect.bisect_left(self._keys, key_hash(seq_id))
        return self._points[i % len(self._points)][1]

    def partition(self, ids: Iterable[int]) -> dict[str, list[int]]:
        """ids grouped by replica, each group in the given order."""
        out: dict[str, list[int]] = {}
        for i in ids:
            out.setdefault(self.route(i), []).append(int(i))
        return out


def resolve_dns(name: str, port: int) -> list[str]:
    """"ip:port" of every A/AAAA record of `name` (a headless Service), sorted. IPv6 as [ip]:port."""
    seen = set()
    for family, _, _, _, sockaddr in socket.getaddrinfo(name, port, type=socket.SOCK_STREAM):
        ip = sockaddr[0]
        seen.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return sorted(seen)


def statefulset_addresses(statefulset: str, service: str, replicas: int, port: int,
                          namespace: str | None = None,
                          cluster_domain: str = "cluster.local") -> list[str]:
    """Stable per-pod DNS names of a StatefulSet behind a headless Service:
    <statefulset>-<i>.<service>[.<namespace>.svc.<cluster_domain>]:<port>."""
    suffix = f".{namespace}.svc.{cluster_domain}" if namespace else ""
    return [f"{statefulset}-{i}.{service}{suffix}:{port}" for i in range(replicas)]


def parse_replicas(spec: str, default_port: int = 50051) -> list[str]:
    """"a:1,b:2" -> list; "dns:///name:port" or "dns:name:port" -> resolve_dns."""
    spec = spec.strip()
    if spec.startswith("dns:"):
        rest = spec[4:].lstrip("/")
        host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", str(default_port))
        return resolve_dns(host, int(port))
    return [s.strip() for s in spec.split(",") if s.strip()]


class ReplicaErrors(KVBufferError):
    """Some replicas failed a routed call. `errors` maps replica -> KVBufferError, `failed_ids`
    lists the sequences routed to them, `results` maps the replicas that succeeded -> their
    result. `code` is that of the first failure."""

    def __init__(self, rpc: str, errors: dict[str, KVBufferError], failed_ids: list[int],
                 results: dict[str, Any]):
        first = next(iter(errors.values()))
        self.errors = errors
        self.failed_ids = failed_ids
        self.results = results
        msg = "; ".join(f"{r}: {e.code.name} {e.details}" for r, e in errors.items())
        super().__init__(first.code, msg, rpc, ",".join(errors))


class RoutedClient:
    """The Client operations over several replicas, each sequence sent to its replica on the ring.
    Batched calls are split by replica and sent in parallel; outputs come back in the caller's
    order. A replica that fails affects only its sequences (ReplicaErrors names them)."""

    def __init__(self, replicas: Sequence[str] | None = None, *, dns: str | None = None,
                 port: int = 50051, vnodes: int = DEFAULT_VNODES, max_workers: int = 16,
                 **client_kwargs):
        if (replicas is None) == (dns is None):
            raise ValueError("give either replicas or dns")
        self._dns, self._port = dns, port
        self._client_kwargs = client_kwargs
        self._lock = threading.Lock()
        self._clients: dict[str, Client] = {}
        self._ring = HashRing((), vnodes)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kvb-route")
        self._set(list(replicas) if replicas is not None else resolve_dns(dns, port))

    # -- membership ------------------------------------------------------------------------
    def _set(self, replicas: list[str]) -> None:
        with self._lock:
            self._ring.set_replicas(replicas)
            for r in replicas:
                if r not in self._clients:
                    self._clients[r] = Client(r, **self._client_kwargs)
            for r in [r for r in self._clients if r not in self._ring]:
                self._clients.pop(r).close()

    @property
    def replicas(self) -> list[str]:
        with self._lock:
            return self._ring.replicas

    def refresh(self) -> list[str]:
        """Re-resolves the DNS name (headless Service) and updates the ring."""
        if self._dns is None:
            return self.replicas
        self._set(resolve_dns(self._dns, self._port))
        return self.replicas

    def add_replica(self, replica: str) -> None:
        self._set(self.replicas + [replica])

    def remove_replica(self, replica: str) -> None:
        self._set([r for r in self.replicas if r != replica])

    def replica_for(self, seq_id: int) -> str:
        with self._lock:
            return self._ring.route(seq_id)

    def client_for(self, seq_id: int) -> Client:
        with self._lock:
            return self._clients[self._ring.route(seq_id)]

    def client(self, replica: str) -> Client:
        with self._lock:
            return self._clients[replica]

    # -- fan-out ---------------------------------------------------------------------------
    def _fan_out(self, rpc: str, groups: dict[str, Any], fn) -> dict[str, Any]:
        """Runs fn(client, group) per replica in parallel; raises ReplicaErrors on any failure."""
        with self._lock:
            clients = {r: self._clients[r] for r in groups}
        futures = {r: self._pool.submit(fn, clients[r], g) for r, g in groups.items()}
        results, errors, failed = {}, {}, []
        for r, f in futures.items():
            try:
                results[r] = f.result()
            except KVBufferError as e:
                errors[r] = e
                failed.extend(_ids_of(groups[r]))
        if errors:
            raise ReplicaErrors(rpc, errors, failed, results)
        return results

    def _partition(self, ids: Iterable[int]) -> dict[str, list[int]]:
        with self._lock:
            return self._ring.partition(ids)

    def get_server_info(self, capacity_queries=(), **kw) -> dict[str, Any]:
        """GetServerInfo of every replica."""
        return self._fan_out("GetServerInfo", {r: None for r in self.replicas},
                             lambda c, _: c.get_server_info(capacity_queries, **kw))

    def health(self, service: str = "", **kw) -> dict[str, str]:
        out = {}
        for r in self.replicas:
            try:
                out[r] = self.client(r).health(service, **kw)
            except KVBufferError as e:
                out[r] = e.code.name
        return out

    def open_sequences(self, ids: Iterable[int], **kw) -> None:
        self._fan_out("OpenSequences", self._partition(ids),
                      lambda c, g: c.open_sequences(g, **kw))

    def close_sequences(self, ids: Iterable[int], **kw) -> None:
        self._fan_out("CloseSequences", self._partition(ids),
                      lambda c, g: c.close_sequences(g, **kw))

    def flush(self, ids: Iterable[int], **kw) -> None:
        self._fan_out("Flush", self._partition(ids), lambda c, g: c.flush(g, **kw))

    def commit_drafts(self, items: Iterable[tuple[int, int, int]], **kw) -> None:
        items = [tuple(int(v) for v in it) for it in items]
        groups: dict[str, list] = {}
        with self._lock:
            for it in items:
                groups.setdefault(self._ring.route(it[0]), []).append(it)
        self._fan_out("CommitDrafts", groups, lambda c, g: c.commit_drafts(g, **kw))

    def _layer(self, method: str, rpc: str, default_tokens, layer, sequences, qkv, a, b, *,
               input_dtype=None, output_dtype=None, timeout=None, as_torch=None,
               bf16_bits=False) -> LayerResult:
        seqs = list(sequences)
        if default_tokens is None and len(seqs) == 1:
            default_tokens = _rows(qkv)
        seqs = _as_seqs(seqs, default_tokens)
        total = sum(s.num_tokens for s in seqs)
        torch_out = tensors.is_torch(qkv) if as_torch is None else as_torch
        q, dt = tensors.to_numpy(qkv, input_dtype)
        q = q.reshape(total, -1)
        a_, _ = tensors.to_numpy(a, dt)
        b_, _ = tensors.to_numpy(b, dt)
        a_, b_ = a_.reshape(total, -1), b_.reshape(total, -1)
        offsets = np.concatenate([[0], np.cumsum([s.num_tokens for s in seqs])]).astype(np.int64)
        groups: dict[str, list[int]] = {}
        with self._lock:
            for i, s in enumerate(seqs):
                groups.setdefault(self._ring.route(s.id), []).append(i)
        parts = {}
        for r, idx in groups.items():
            rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx])
            parts[r] = (idx, rows, [seqs[i] for i in idx])

        def call(c: Client, part):
            _, rows, sub = part
            fn = getattr(c, method)
            return fn(layer, sub, q[rows], a_[rows], b_[rows], input_dtype=dt,
                      output_dtype=output_dtype, timeout=timeout, as_torch=False,
                      bf16_bits=bf16_bits or torch_out)

        results = self._fan_out(rpc, parts, call)
        first = next(iter(results.values())).output
        out = np.empty((total,) + first.shape[1:], dtype=first.dtype)
        positions = [0] * len(seqs)
        replayed = True
        for r, res in results.items():
            idx, rows, _ = parts[r]
            out[rows] = res.output
            for i, p in zip(idx, res.positions):
                positions[i] = p
            replayed = replayed and res.replayed
        if torch_out:
            import torch  # noqa: PLC0415

            out = (torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
                   if out.dtype == np.uint16 else torch.from_numpy(out))
        return LayerResult(out, replayed, positions)

    def prefill(self, layer, sequences, qkv, a, b, **kw) -> LayerResult:
        return self._layer("prefill", "Prefill", None, layer, sequences, qkv, a, b, **kw)

    def decode_step(self, layer, sequences, qkv, a, b, **kw) -> LayerResult:
        return self._layer("decode_step", "DecodeStep", 1, layer, sequences, qkv, a, b, **kw)

    def verify_drafts(self, layer, sequences, qkv, a, b, **kw) -> LayerResult:
        return self._layer("verify_drafts", "VerifyDrafts", None, layer, sequences, qkv, a, b,
                           **kw)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for c in self._clients.values():
                c.close()
            self._clients.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _ids_of(group) -> list[int]:
    if group is None:
        return []
    if isinstance(group, tuple) and len(group) == 3:  # layer call part
        return [s.id for s in group[2]]
    out = []
    for g in group:
        out.append(int(g[0]) if isinstance(g, tuple) else int(g))
    return out
