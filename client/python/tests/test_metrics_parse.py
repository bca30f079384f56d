"""Prometheus text parsing and the CLI's stats summary (no server needed)."""
import math

from kvbuffer import metrics
from kvbuffer.cli import summarize_metrics

TEXT = """# HELP kvbuffer_requests_total Calls.
# TYPE kvbuffer_requests_total counter
kvbuffer_requests_total{rpc="Prefill",code="OK"} 10
kvbuffer_requests_total{rpc="Prefill",code="NOT_FOUND"} 2
kvbuffer_requests_total{rpc="DecodeStep",code="OK"} 100
# HELP kvbuffer_request_duration_seconds Latency.
# TYPE kvbuffer_request_duration_seconds histogram
kvbuffer_request_duration_seconds_bucket{rpc="Prefill",le="0.001"} 0
kvbuffer_request_duration_seconds_bucket{rpc="Prefill",le="0.002"} 6
kvbuffer_request_duration_seconds_bucket{rpc="Prefill",le="+Inf"} 12
kvbuffer_request_duration_seconds_sum{rpc="Prefill"} 0.05
kvbuffer_request_duration_seconds_count{rpc="Prefill"} 12
# TYPE kvbuffer_state_slots gauge
kvbuffer_state_slots{state="used"} 3
kvbuffer_state_slots{state="free"} 61
# TYPE kvbuffer_drafts_verified_total counter
kvbuffer_drafts_verified_total 40
# TYPE kvbuffer_drafts_accepted_total counter
kvbuffer_drafts_accepted_total 30
# TYPE weird gauge
weird{a="x\\"y\\\\z\\n"} NaN
"""


def test_parse_and_query():
    f = metrics.parse(TEXT)
    assert f["kvbuffer_requests_total"].type == "counter"
    assert metrics.value(f, "kvbuffer_requests_total", rpc="Prefill") == 12
    assert metrics.value(f, "kvbuffer_requests_total", code="OK") == 110
    assert metrics.value(f, "kvbuffer_request_duration_seconds_count", rpc="Prefill") == 12
    assert metrics.value(f, "kvbuffer_state_slots", state="free") == 61
    assert metrics.histogram_quantile(f, "kvbuffer_request_duration_seconds", 0.25,
                                      rpc="Prefill") == 0.0015
    assert metrics.histogram_quantile(f, "kvbuffer_request_duration_seconds", 0.99,
                                      rpc="Prefill") == 0.002
    assert math.isnan(metrics.histogram_quantile(f, "nothing", 0.5))
    assert f["weird"].samples[0][1]["a"] == 'x"y\\z\n'


def test_summary_lines():
    text = "\n".join(summarize_metrics(TEXT))
    assert "Prefill" in text and "NOT_FOUND=2" in text
    assert "used 3  free 61" in text
    assert "75.0% accepted" in text
