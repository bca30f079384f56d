#!/usr/bin/env python3
"""A serving framework's linear-attention layer backed by KVBuffer, SGLang style.

In SGLang (and vLLM) a Qwen3-Next linear-attention layer projects hidden states to mixed qkv, a and
b, runs the Gated DeltaNet kernel against per-request state kept in the framework's memory pool,
then gates, normalises and projects the result. Here the kernel call and the state pool are
replaced by one call per layer to the KVBuffer service, which keeps the state, buffer and conv
window of every request on its GPUs:

    layer.forward(hidden_states, forward_batch)
        extend        -> Prefill       (each request's new tokens at its prefix length)
        decode        -> DecodeStep    (one token per request at seq_len - 1)
        target_verify -> VerifyDrafts  (draft tokens; the scheduler then calls commit_drafts)

Sequence lifecycle (open on admission, close on finish) lives in KVBufferAttentionBackend, shared by
all layers like SGLang's attention backend. Calls go over one Stream per worker (or unary calls),
optionally routed over replicas by consistent hashing (--replicas a:1,b:2 or dns:///svc:50051).

Run against a server (e.g. `kvbuffer-server --backend=cpu --model=tiny --port=0`):
    python examples/sglang_style_layer.py --server 127.0.0.1:PORT --check
--check recomputes every layer output with the fp64 numpy reference and prints the largest error.
"""
from __future__ import annotations

import argparse
import enum
import sys
from dataclasses import dataclass, field

import numpy as np

import kvbuffer
from kvbuffer import reference


class ForwardMode(enum.Enum):
    EXTEND = "extend"
    DECODE = "decode"
    TARGET_VERIFY = "target_verify"

    def is_extend(self):
        return self is ForwardMode.EXTEND

    def is_decode(self):
        return self is ForwardMode.DECODE

    def is_target_verify(self):
        return self is ForwardMode.TARGET_VERIFY


@dataclass
class ForwardBatch:
    """The part of SGLang's ForwardBatch a linear-attention layer needs. Tokens of the requests
    are concatenated in order (hidden_states is [sum of tokens, hidden])."""
    forward_mode: ForwardMode
    rids: list[int]                     # request (sequence) ids
    seq_lens: list[int]                 # tokens of each request including this forward's
    extend_prefix_lens: list[int] = field(default_factory=list)  # extend: tokens already cached
    extend_seq_lens: list[int] = field(default_factory=list)     # extend: new tokens
    draft_token_num: int = 0            # target_verify: drafts per request

    @property
    def num_tokens(self) -> int:
        if self.forward_mode.is_extend():
            return sum(self.extend_seq_lens)
        if self.forward_mode.is_target_verify():
            return self.draft_token_num * len(self.rids)
        return len(self.rids)


class KVBufferAttentionBackend:
    """Shared by every linear-attention layer of a model worker: the connection (one Stream, or a
    router over replicas) and the sequence lifecycle."""

    def __init__(self, server: str | None = None, replicas: str | None = None,
                 use_stream: bool = True, timeout: float = 30.0):
        if replicas:
            self.client = kvbuffer.RoutedClient(kvbuffer.routing.parse_replicas(replicas),
                                                timeout=timeout)
            self.ops = self.client  # routed calls are unary, fanned out per replica
            info = next(iter(self.client.get_server_info().values()))
        else:
            self.client = kvbuffer.Client(server, timeout=timeout)
            self.ops = self.client.stream() if use_stream else self.client
            info = self.client.get_server_info()
        self.info = info
        self.config = reference.ModelConfig.from_server_info(info)

    def on_admit(self, rids):            # scheduler admitted new requests
        self.ops.open_sequences(rids)

    def on_finish(self, rids):           # requests finished or aborted
        self.ops.close_sequences(rids)

    def on_accept(self, rids, committed_lens, accepted):  # after speculative verification
        self.ops.commit_drafts(list(zip(rids, committed_lens, accepted)))

    def close(self):
        if isinstance(self.ops, kvbuffer.StreamSession):
            self.ops.close()
        self.client.close()


class KVBufferGatedDeltaNet:
    """Qwen3-Next-style linear-attention layer whose core runs in the KVBuffer service."""

    def __init__(self, layer_id: int, hidden_size: int, backend: KVBufferAttentionBackend,
                 rng: np.random.Generator, dtype=np.float32):
        c = backend.config
        self.layer_id = layer_id
        self.backend = backend
        self.cfg = c
        s = 1.0 / np.sqrt(hidden_size)
        # in_proj_qkv, in_proj_a, in_proj_b, out_proj (random stand-ins for checkpoint weights).
        self.w_qkv = (rng.standard_normal((hidden_size, c.channels)) * s).astype(dtype)
        self.w_a = (rng.standard_normal((hidden_size, c.num_v_heads)) * s).astype(dtype)
        self.w_b = (rng.standard_normal((hidden_size, c.num_v_heads)) * s).astype(dtype)
        self.w_o = (rng.standard_normal((c.num_v_heads * c.head_v_dim, hidden_size))
                    / np.sqrt(c.num_v_heads * c.head_v_dim)).astype(dtype)
        self.last_inputs = None  # (qkv, a, b) of the last forward, for --check
        self.last_core = None    # the service's output of the last forward

    def forward(self, hidden_states: np.ndarray, forward_batch: ForwardBatch) -> np.ndarray:
        mixed_qkv = hidden_states @ self.w_qkv
        a = hidden_states @ self.w_a
        b = hidden_states @ self.w_b
        self.last_inputs = (mixed_qkv, a, b)
        fb, ops, layer = forward_batch, self.backend.ops, self.layer_id
        if fb.forward_mode.is_decode():
            # seq_lens counts the token being decoded: the cached position is seq_len - 1.
            spec = [(rid, n - 1) for rid, n in zip(fb.rids, fb.seq_lens)]
            out = ops.decode_step(layer, spec, mixed_qkv, a, b).output
        elif fb.forward_mode.is_extend():
            spec = list(zip(fb.rids, fb.extend_prefix_lens, fb.extend_seq_lens))
            out = ops.prefill(layer, spec, mixed_qkv, a, b).output
        else:
            # Verify: seq_lens are the committed lengths; drafts stay tentative until commit.
            spec = [(rid, n, fb.draft_token_num) for rid, n in zip(fb.rids, fb.seq_lens)]
            out = ops.verify_drafts(layer, spec, mixed_qkv, a, b).output
        core = np.asarray(out, dtype=np.float32).reshape(fb.num_tokens, -1)  # [T, HV*V]
        self.last_core = core
        # (Qwen3-Next applies a gated RMSNorm with z here; omitted in this sketch.)
        return core @ self.w_o


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", default="127.0.0.1:50051")
    ap.add_argument("--replicas", help="route over replicas: a:1,b:2 or dns:///name:port")
    ap.add_argument("--unary", action="store_true", help="unary calls instead of one Stream")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6, help="decode steps")
    ap.add_argument("--check", action="store_true", help="compare with the fp64 reference")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    backend = KVBufferAttentionBackend(args.server, args.replicas, use_stream=not args.unary)
    cfg = backend.config
    rng = np.random.default_rng(args.seed)
    layers = [KVBufferGatedDeltaNet(i, args.hidden, backend, rng) for i in range(cfg.num_layers)]
    params = reference.make_all_layer_params(cfg) if args.check else None
    rids = [int(x) for x in rng.integers(1, 2**62, size=3)]
    prompt = [5, 13, 2]
    oracles = {r: reference.OracleSequence(cfg, params) for r in rids} if args.check else {}
    worst = 0.0

    def run(fb: ForwardBatch, tentative=False):
        nonlocal worst
        h = rng.standard_normal((fb.num_tokens, args.hidden)).astype(np.float32)
        per_req = (fb.extend_seq_lens if fb.forward_mode.is_extend()
                   else [fb.draft_token_num] * len(fb.rids) if fb.forward_mode.is_target_verify()
                   else [1] * len(fb.rids))
        drafts = {}
        for layer in layers:
            h = h + layer.forward(h, fb)  # residual stream (MoE/MLP omitted)
            if args.check:
                qkv, a, b = layer.last_inputs
                core = layer.last_core
                off = 0
                for rid, n in zip(fb.rids, per_req):
                    o = oracles[rid].copy() if tentative else oracles[rid]
                    want = o.append(layer.layer_id, qkv[off:off + n], a[off:off + n],
                                    b[off:off + n])
                    if tentative:
                        drafts.setdefault(rid, []).append((qkv[off:off + n], a[off:off + n],
                                                           b[off:off + n]))
                    err = reference.relative_error(core[off:off + n].ravel(), want.ravel())
                    worst = max(worst, err)
                    off += n
        return drafts

    backend.on_admit(rids)
    run(ForwardBatch(ForwardMode.EXTEND, rids, prompt, [0, 0, 0], prompt))
    lens = list(prompt)
    for _ in range(args.steps):
        lens = [n + 1 for n in lens]
        run(ForwardBatch(ForwardMode.DECODE, rids, lens))
    m = min(3, backend.info.buffer.max_drafts)
    drafts = run(ForwardBatch(ForwardMode.TARGET_VERIFY, rids, lens, draft_token_num=m),
                 tentative=True)
    accepted = [m, 1, 0]
    backend.on_accept(rids, lens, accepted)
    if args.check:
        for rid, acc in zip(rids, accepted):
            for layer_id, (q, a, b) in enumerate(drafts[rid]):
                if acc:
                    oracles[rid].append(layer_id, q[:acc], a[:acc], b[:acc])
    lens = [n + acc + 1 for n, acc in zip(lens, accepted)]
    run(ForwardBatch(ForwardMode.DECODE, rids, lens))
    backend.on_finish(rids)
    backend.close()
    print(f"ran {cfg.num_layers} layers x (prefill {sum(prompt)} tokens, {args.steps + 1} decode "
          f"steps, verify {m} drafts) for {len(rids)} requests on {cfg.name}")
    if args.check:
        print(f"max relative error vs fp64 reference: {worst:.3g}")
        return 0 if worst < 1e-3 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
