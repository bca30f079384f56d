#!/usr/bin/env python3
"""Project rules for rendered KVBuffer manifests (beyond schema validity).

usage: check_manifests.py RENDERED.yaml [--gpus=N]
Exit 0 when every rule holds; otherwise prints each violation and exits 1. Rules include: gRPC
probes on the health names, on the plaintext --health_port when the API port has TLS; TLS and token
files under mounted Secrets.
"""
from __future__ import annotations

import argparse
import re
import sys

import yaml

HEALTH = {"liveness": "liveness", "readiness": "readiness"}  # service/server/health_names.h
GRPC_PORT = 50051


def seconds_in(command: list[str]) -> float:
    m = re.search(r"sleep\s+(\d+(?:\.\d+)?)", " ".join(command))
    return float(m.group(1)) if m else 0.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--gpus", type=int, default=1)
    args = ap.parse_args()
    with open(args.file) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    errors: list[str] = []
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    def need(cond: bool, msg: str):
        if not cond:
            errors.append(msg)

    sts_list = by_kind.get("StatefulSet", [])
    need(len(sts_list) == 1, f"want 1 StatefulSet, got {len(sts_list)}")
    svcs = by_kind.get("Service", [])
    pdbs = by_kind.get("PodDisruptionBudget", [])
    cms = by_kind.get("ConfigMap", [])
    need(len(pdbs) == 1, "want 1 PodDisruptionBudget")
    need(len(cms) == 1, "want 1 ConfigMap (server flags)")
    for sts in sts_list:
        spec = sts["spec"]
        pod = spec["template"]["spec"]
        labels = spec["template"]["metadata"].get("labels", {})
        sel = spec["selector"]["matchLabels"]
        need(all(labels.get(k) == v for k, v in sel.items()), "selector does not match pod labels")
        svc = next((s for s in svcs if s["metadata"]["name"] == spec["serviceName"]), None)
        need(svc is not None, f"serviceName {spec['serviceName']} has no Service")
        if svc:
            need(svc["spec"].get("clusterIP") == "None", "the Service must be headless")
            need(all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()),
                 "Service selector does not match pod labels")
            need(any(p["port"] == GRPC_PORT for p in svc["spec"]["ports"]), "Service lacks gRPC port")
        for pdb in pdbs:
            need(all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items()),
                 "PDB selector does not match pod labels")
            need("maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"], "PDB has no budget")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        need(pod.get("securityContext", {}).get("runAsNonRoot") is True, "pod must run as non-root")
        server = next((c for c in pod["containers"] if c["name"] == "server"), None)
        need(server is not None, "no container named server")
        if server is None:
            continue
        res = server.get("resources", {})
        gpus = str(res.get("limits", {}).get("nvidia.com/gpu", ""))
        need(gpus == str(args.gpus), f"nvidia.com/gpu limit {gpus!r}, want {args.gpus}")
        need("memory" in res.get("limits", {}), "no memory limit")
        need("cpu" in res.get("requests", {}), "no cpu request")
        flags_text = "\n".join(cm.get("data", {}).get("server.flags", "") for cm in cms)

        def flag(name):
            m = re.search(rf"^--{name}=(\S+)\s*$", flags_text, re.M)
            return m.group(1) if m else None

        # Probes: kubelet gRPC probes speak neither TLS nor tokens, so with TLS on the API port
        # they must use the plaintext health-only port (--health_port), which the container
        # declares.
        health_port = int(flag("health_port")) if flag("health_port") else None
        probe_port = health_port if health_port not in (None, -1) else GRPC_PORT
        need(flag("tls_cert") is None or probe_port != GRPC_PORT,
             "TLS on the API port but probes on it: set --health_port and probe that port")
        container_ports = {p["containerPort"] for p in server.get("ports", [])}
        need(probe_port in container_ports, f"probe port {probe_port} is no containerPort")
        need(probe_port == GRPC_PORT or probe_port != int(flag("metrics_port") or -1),
             "--health_port must differ from --metrics_port")
        for probe, name in (("livenessProbe", "liveness"), ("readinessProbe", "readiness"),
                            ("startupProbe", "liveness")):
            p = server.get(probe, {}).get("grpc")
            need(p is not None, f"{probe} is not a gRPC probe")
            if p:
                need(p.get("service") == HEALTH[name], f"{probe} service {p.get('service')!r}")
                need(p.get("port") == probe_port, f"{probe} port {p.get('port')}, want {probe_port}")
        # Credentials named by the flags come from mounted Secrets, never the image or ConfigMap.
        secret_mounts = [m["mountPath"].rstrip("/") + "/"
                         for m in server.get("volumeMounts", [])
                         if "secret" in next((v for v in pod.get("volumes", [])
                                              if v["name"] == m["name"]), {})]
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens_file"):
            path = flag(name)
            if path:
                need(any(path.startswith(m) for m in secret_mounts),
                     f"--{name}={path} is not under a mounted Secret")
        need(flag("tls_key") is None or flag("tls_cert") is not None, "--tls_key without --tls_cert")
        pre = server.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        need(any("kill -TERM 1" in c for c in pre), "preStop does not start the drain")
        need(seconds_in(pre) < grace, f"preStop sleep {seconds_in(pre)} >= grace {grace}")
        args_ = server.get("args", [])
        need(any(a.startswith("--flagfile=") for a in args_), "server flags not read from a file")
        mounts = {m["name"]: m["mountPath"] for m in server.get("volumeMounts", [])}
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        flag_vol = next((n for n, v in vols.items() if "configMap" in v), None)
        need(flag_vol in mounts, "flags ConfigMap not mounted")
        for cm in cms:
            need(vols.get(flag_vol, {}).get("configMap", {}).get("name") == cm["metadata"]["name"],
                 "volume does not reference the generated ConfigMap")
            flags = cm.get("data", {}).get("server.flags", "")
            need("--port=50051" in flags, "flags lack --port=50051")
            drain = re.search(r"--drain_grace_seconds=(\d+(?:\.\d+)?)", flags)
            stop = re.search(r"--shutdown_timeout_seconds=(\d+(?:\.\d+)?)", flags)
            need(drain is not None and stop is not None, "flags lack drain/shutdown times")
            if drain and stop:
                need(float(drain.group(1)) + float(stop.group(1)) < grace,
                     "drain_grace + shutdown_timeout must fit terminationGracePeriodSeconds")
            # kvbuffer-server's flags (server_flags.cc): an unknown one stops the server at start.
            need("--tensor_parallel_size" not in flags,
                 "--tensor_parallel_size is no server flag; use --tensor_parallel=N")
            tp = re.search(r"^--tensor_parallel=(\d+)\s*$", flags, re.M)
            need((int(tp.group(1)) if tp else 1) == args.gpus,
                 f"tensor_parallel {tp.group(1) if tp else 1} != GPUs {args.gpus}")
            if tp and int(tp.group(1)) > 1:
                mode = re.search(r"^--tp_mode=(\S+)\s*$", flags, re.M)
                need(mode is not None and mode.group(1) == "threads",
                     "one pod drives its GPUs: --tp_mode=threads (processes needs a worker per GPU)")
        if args.gpus > 1:
            need(any(e.get("name") == "NCCL_NVLS_ENABLE" and e.get("value") == "0"
                     for e in server.get("env", [])), "NCCL_NVLS_ENABLE=0 missing")
            need(mounts.get("dshm") == "/dev/shm", "/dev/shm not mounted for NCCL")
    for e in errors:
        print(f"{args.file}: {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
