"""kvbuffer-cli: operations against a running KVBuffer server.

    kvbuffer-cli --server 127.0.0.1:50051 info [--json]
    kvbuffer-cli --server 127.0.0.1:50051 health [--service NAME]...
    kvbuffer-cli --server 127.0.0.1:50051 capacity --length 32768 --drafts 4
    kvbuffer-cli --metrics http://127.0.0.1:9464/metrics stats
    kvbuffer-cli --server kvb-0:50051 --tls-ca ca.pem --token-file my.token info   # TLS + token

Exit status: 0 on success (health: every checked name SERVING), 1 on a failed check, 2 when the
server cannot be reached or answers with an error.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from kvbuffer import HEALTH_LIVENESS, HEALTH_READINESS
from kvbuffer import metrics as prom
from kvbuffer.capacity import Layout
from kvbuffer.client import Client, KVBufferError
from kvbuffer.tensors import normalize_dtype


def _fmt_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _dtype(v: int) -> str:
    try:
        return (normalize_dtype(v) or "unspecified").upper()
    except ValueError:
        return str(v)


def _to_dict(msg) -> dict:
    from google.protobuf import json_format

    try:
        return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    except TypeError:  # protobuf < 5.26
        return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                         including_default_value_fields=True)


def cmd_info(client: Client, args) -> int:
    info = client.get_server_info()
    if args.json:
        print(json.dumps(_to_dict(info), indent=2))
        return 0
    m, b, c = info.model, info.buffer, info.capacity
    print(f"server      {client.target}  version {info.version}  backend {info.backend}  "
          f"tp {info.tensor_parallel_size or 1}")
    print(f"model       {m.name}: L={m.num_layers} H={m.num_k_heads} HV={m.num_v_heads} "
          f"K={m.head_k_dim} V={m.head_v_dim} W={m.conv_width} channels={m.channels} "
          f"params={m.params_source or 'seed'}:{m.param_seed}")
    print(f"buffer      C={b.flush_interval} stateless_limit={b.stateless_limit} "
          f"max_drafts={b.max_drafts} page_tokens={b.page_tokens} buffer={_dtype(b.buffer_dtype)} "
          f"conv={_dtype(b.conv_dtype)} state={_dtype(b.state_dtype)} idle_ttl={b.idle_ttl_seconds:g}s")
    print(f"sequences   {c.open_sequences}/{c.max_sequences} open")
    print(f"state slots {c.state_slots - c.free_state_slots}/{c.state_slots} used "
          f"({_fmt_bytes(c.state_slot_bytes)} each)")
    print(f"buf pages   {c.buffer_pages - c.free_buffer_pages}/{c.buffer_pages} used "
          f"({_fmt_bytes(c.buffer_page_bytes)} each); conv slot {_fmt_bytes(c.conv_slot_bytes)}")
    dev = (f"; device {_fmt_bytes(c.device_free_bytes)} free of {_fmt_bytes(c.device_total_bytes)}"
           if c.device_total_bytes else "")
    print(f"memory      pools {_fmt_bytes(c.pool_bytes)}{dev}")
    k = info.counters
    print(f"counters    flushes={k.flushes} drafts_verified={k.drafts_verified} "
          f"drafts_accepted={k.drafts_accepted}")
    print(f"features    {', '.join(info.features) or '-'}  max_message={_fmt_bytes(info.max_message_bytes)}")
    return 0


def cmd_health(client: Client, args) -> int:
    names = args.service or ["", HEALTH_LIVENESS, HEALTH_READINESS]
    ok = True
    for name in names:
        status = client.health(name, timeout=args.timeout)
        print(f"{name or '(server)':<12} {status}")
        ok = ok and status == "SERVING"
    return 0 if ok else 1


def cmd_capacity(client: Client, args) -> int:
    info = client.get_server_info([(args.length, args.drafts)])
    est = None
    for e in info.capacity.estimates:
        if e.length == args.length and e.drafts == args.drafts:
            est = e
    lay = Layout.from_server_info(info)
    local = {
        "kvbuffer_bytes_per_sequence": lay.kvbuffer_bytes(args.length, args.drafts),
        "recurrent_bytes_per_sequence": lay.recurrent_bytes(args.length, args.drafts),
    }
    if args.json:
        out = {"server": _to_dict(est) if est is not None else None, "formula": local}
        print(json.dumps(out, indent=2))
        return 0
    print(f"length {args.length} tokens, {args.drafts} drafts per step, model {info.model.name}")
    if est is not None:
        print(f"  kvbuffer bytes/sequence   {_fmt_bytes(est.kvbuffer_bytes_per_sequence)}")
        print(f"  recurrent bytes/sequence  {_fmt_bytes(est.recurrent_bytes_per_sequence)}")
        print(f"  sequences that fit now    {est.max_sequences_now}")
        print(f"  at equal memory           kvbuffer {est.max_sequences_at_equal_memory} vs "
              f"recurrent {est.recurrent_sequences_at_equal_memory} (x{est.ratio:.2f})")
    else:
        print("  (server returned no estimate for this query)")
    print(f"  formula (docs/operations.md): kvbuffer {_fmt_bytes(local['kvbuffer_bytes_per_sequence'])}, "
          f"recurrent {_fmt_bytes(local['recurrent_bytes_per_sequence'])}")
    return 0


def summarize_metrics(text: str) -> list[str]:
    """Human summary of a /metrics scrape."""
    f = prom.parse(text)
    lines = []
    req = f.get("kvbuffer_requests_total")
    if req:
        by_rpc: dict[str, dict[str, float]] = {}
        for _, lab, v in req.samples:
            by_rpc.setdefault(lab.get("rpc", "?"), {})[lab.get("code", "?")] = v
        lines.append(f"{'rpc':<16}{'requests':>10}{'errors':>8}{'p50 ms':>10}{'p99 ms':>10}")
        for rpc in sorted(by_rpc):
            codes = by_rpc[rpc]
            total = sum(codes.values())
            errs = total - codes.get("OK", 0)
            p50 = prom.histogram_quantile(f, "kvbuffer_request_duration_seconds", 0.5, rpc=rpc)
            p99 = prom.histogram_quantile(f, "kvbuffer_request_duration_seconds", 0.99, rpc=rpc)
            ms = lambda x: "-" if math.isnan(x) else f"{x * 1e3:.3f}"  # noqa: E731
            lines.append(f"{rpc:<16}{total:>10.0f}{errs:>8.0f}{ms(p50):>10}{ms(p99):>10}")
            bad = {c: v for c, v in codes.items() if c != "OK" and v}
            if bad:
                lines.append("    " + ", ".join(f"{c}={v:.0f}" for c, v in sorted(bad.items())))
    v = lambda n, **lab: prom.value(f, n, **lab)  # noqa: E731
    lines.append(f"active sequences  {v('kvbuffer_active_sequences'):.0f}")
    lines.append(f"state slots       used {v('kvbuffer_state_slots', state='used'):.0f}  "
                 f"free {v('kvbuffer_state_slots', state='free'):.0f}")
    lines.append(f"buffer pages      used {v('kvbuffer_buffer_pages', state='used'):.0f}  "
                 f"free {v('kvbuffer_buffer_pages', state='free'):.0f}")
    ver, acc = v("kvbuffer_drafts_verified_total"), v("kvbuffer_drafts_accepted_total")
    rate = f" ({acc / ver:.1%} accepted)" if ver else ""
    lines.append(f"flushes           {v('kvbuffer_flushes_total'):.0f}")
    lines.append(f"drafts            verified {ver:.0f}  accepted {acc:.0f}{rate}")
    lines.append(f"bytes             in {_fmt_bytes(v('kvbuffer_bytes_received_total'))}  "
                 f"out {_fmt_bytes(v('kvbuffer_bytes_sent_total'))}")
    mem = f.get("kvbuffer_device_memory_bytes")
    if mem and mem.samples:
        lines.append("device memory     " + "  ".join(
            f"{lab.get('kind', '?')} {_fmt_bytes(val)}" for _, lab, val in mem.samples))
    return lines


def cmd_stats(args) -> int:
    url = args.metrics
    if not url:
        host = args.server.rsplit(":", 1)[0] if args.server else "127.0.0.1"
        url = f"http://{host}:{args.metrics_port}/metrics"
    text = prom.scrape(url, timeout=args.timeout)
    if args.raw:
        sys.stdout.write(text)
        return 0
    print(f"metrics {url}")
    for line in summarize_metrics(text):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvbuffer-cli", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default=os.environ.get("KVBUFFER_SERVER", "127.0.0.1:50051"),
                   help="host:port of the gRPC server (env KVBUFFER_SERVER)")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline per call, seconds")
    p.add_argument("--token", default=os.environ.get("KVBUFFER_TOKEN"),
                   help="bearer token (env KVBUFFER_TOKEN)")
    p.add_argument("--token-file", default=os.environ.get("KVBUFFER_TOKEN_FILE"),
                   help="file whose first line is the bearer token (env KVBUFFER_TOKEN_FILE)")
    p.add_argument("--tls", action="store_true",
                   help="connect with TLS (system roots unless --tls-ca)")
    p.add_argument("--tls-ca", default=os.environ.get("KVBUFFER_TLS_CA"),
                   help="PEM CA the server certificate must chain to; implies --tls "
                        "(env KVBUFFER_TLS_CA)")
    p.add_argument("--tls-cert", default=os.environ.get("KVBUFFER_TLS_CERT"),
                   help="PEM client certificate for mutual TLS; implies --tls "
                        "(env KVBUFFER_TLS_CERT)")
    p.add_argument("--tls-key", default=os.environ.get("KVBUFFER_TLS_KEY"),
                   help="PEM private key of --tls-cert (env KVBUFFER_TLS_KEY)")
    p.add_argument("--tls-server-name", default=None,
                   help="name the server certificate must carry (default: the --server host)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("info", help="model, buffer settings, capacity, counters")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("health", help="grpc.health.v1 liveness/readiness")
    s.add_argument("--service", action="append",
                   help=f"health name to check (repeatable; default '', {HEALTH_LIVENESS}, "
                        f"{HEALTH_READINESS})")
    s = sub.add_parser("capacity", help="bytes per sequence and sequences that fit")
    s.add_argument("--length", type=int, required=True, help="tokens per sequence")
    s.add_argument("--drafts", type=int, default=0, help="draft tokens verified per step")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("stats", help="summary of the /metrics endpoint")
    s.add_argument("--metrics", default=os.environ.get("KVBUFFER_METRICS"),
                   help="metrics URL (default http://<server host>:<metrics-port>/metrics)")
    s.add_argument("--metrics-port", type=int, default=9464)
    s.add_argument("--raw", action="store_true", help="print the scrape as is")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "stats":
            return cmd_stats(args)
        token = None if args.token_file else args.token  # an explicit file wins over the env
        with Client(args.server, timeout=args.timeout, retries=1, token=token,
                    token_file=args.token_file, tls=args.tls, tls_ca=args.tls_ca,
                    tls_cert=args.tls_cert, tls_key=args.tls_key,
                    tls_server_name=args.tls_server_name) as client:
            return {"info": cmd_info, "health": cmd_health, "capacity": cmd_capacity}[args.cmd](
                client, args)
    except KVBufferError as e:
        print(f"kvbuffer-cli: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"kvbuffer-cli: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
