"""Parsing the Prometheus text exposition format (0.0.4) of the server's /metrics endpoint."""
from __future__ import annotations

import math
import re
import urllib.request
from dataclasses import dataclass, field

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+-?\d+)?\s*$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


@dataclass
class Family:
    name: str
    type: str = "untyped"
    help: str = ""
    samples: list[tuple[str, dict, float]] = field(default_factory=list)  # (name, labels, value)


def _unescape(s: str) -> str:
    return s.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")


def _value(s: str) -> float:
    special = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}
    return special[s] if s in special else float(s)


def parse(text: str) -> dict[str, Family]:
    """Families by name; histogram/summary samples (_bucket, _sum, _count) join their family.
    Raises ValueError on a malformed line."""
    fams: dict[str, Family] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                fam = fams.setdefault(parts[2], Family(parts[2]))
                rest = parts[3] if len(parts) > 3 else ""
                if parts[1] == "TYPE":
                    fam.type = rest.strip()
                else:
                    fam.help = rest.replace("\\n", "\n").replace("\\\\", "\\")
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise ValueError(f"line {n}: not a sample: {line!r}")
        name, labels_text, value = m.group(1), m.group(3) or "", m.group(4)
        labels = {}
        pos = 0
        while pos < len(labels_text):
            lm = _LABEL.match(labels_text, pos)
            if not lm:
                raise ValueError(f"line {n}: bad labels: {labels_text!r}")
            labels[lm.group(1)] = _unescape(lm.group(2))
            pos = lm.end()
        base = name
        for suffix in ("_bucket", "_sum", "_count", "_created"):
            if name.endswith(suffix) and name[: -len(suffix)] in fams and \
                    fams[name[: -len(suffix)]].type in ("histogram", "summary"):
                base = name[: -len(suffix)]
        fam = fams.setdefault(base, Family(base))
        fam.samples.append((name, labels, _value(value)))
    return fams


def value(fams: dict[str, Family], name: str, **labels) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 if none)."""
    base = name
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in fams:
            base = name[: -len(suffix)]
    fam = fams.get(base) or fams.get(name)
    if fam is None:
        return 0.0
    return sum(v for n, lab, v in fam.samples
               if n == name and all(lab.get(k) == str(x) for k, x in labels.items()))


def histogram_quantile(fams: dict[str, Family], name: str, q: float, **labels) -> float:
    """Quantile q of a histogram (summed over series matching labels), interpolated linearly
    within buckets like PromQL's histogram_quantile. NaN when empty."""
    fam = fams.get(name)
    if fam is None:
        return math.nan
    buckets: dict[float, float] = {}
    for n, lab, v in fam.samples:
        if n == f"{name}_bucket" and all(lab.get(k) == str(x) for k, x in labels.items()):
            le = _value(lab["le"])
            buckets[le] = buckets.get(le, 0.0) + v
    if not buckets:
        return math.nan
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return math.nan
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if math.isinf(b):
                return prev_bound
            if c == prev_count:
                return b
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (c - prev_count)
        prev_bound, prev_count = b, c
    return bounds[-1]


def scrape(url: str, timeout: float = 5.0) -> str:
    """GET url (http://host:port/metrics) and return the body."""
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - operator-given URL
        return r.read().decode("utf-8")
