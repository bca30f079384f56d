"""The server's /metrics endpoint (when this build has --metrics_port): scraped after traffic."""
import urllib.error
import urllib.request

import numpy as np
import pytest

import kvbuffer
from kvbuffer import metrics, reference
from helpers import activations, new_id

pytestmark = pytest.mark.server


def test_metrics_after_traffic(server, client):
    if server.metrics_url is None:
        pytest.skip("this kvbuffer-server build has no --metrics_port")
    before = metrics.parse(metrics.scrape(server.metrics_url))
    cfg = reference.ModelConfig.from_server_info(client.get_server_info())
    rng = np.random.default_rng(31)
    sid = new_id()
    client.open_sequences([sid])
    (qkv, a, b), _ = activations(rng, cfg, 12)
    client.prefill(0, [(sid, 0, 12)], qkv, a, b)
    with pytest.raises(kvbuffer.KVBufferError):
        client.flush([new_id()])
    f = metrics.parse(metrics.scrape(server.metrics_url))
    for name, typ in [("kvbuffer_requests_total", "counter"),
                      ("kvbuffer_request_duration_seconds", "histogram"),
                      ("kvbuffer_active_sequences", "gauge"), ("kvbuffer_state_slots", "gauge"),
                      ("kvbuffer_buffer_pages", "gauge"), ("kvbuffer_flushes_total", "counter"),
                      ("kvbuffer_drafts_verified_total", "counter"),
                      ("kvbuffer_drafts_accepted_total", "counter"),
                      ("kvbuffer_bytes_received_total", "counter"),
                      ("kvbuffer_bytes_sent_total", "counter"),
                      ("kvbuffer_device_memory_bytes", "gauge")]:
        assert name in f and f[name].type == typ, name
    d = lambda n, **lab: metrics.value(f, n, **lab) - metrics.value(before, n, **lab)  # noqa: E731
    assert d("kvbuffer_requests_total", rpc="Prefill", code="OK") == 1
    assert d("kvbuffer_requests_total", rpc="Flush", code="NOT_FOUND") == 1
    assert d("kvbuffer_request_duration_seconds_count", rpc="Prefill") == 1
    assert d("kvbuffer_bytes_received_total") >= qkv.nbytes
    assert metrics.value(f, "kvbuffer_active_sequences") >= 1
    assert metrics.value(f, "kvbuffer_state_slots", state="used") >= 1  # 12 > stateless limit 8
    client.close_sequences([sid])
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.metrics_url.replace("/metrics", "/other"), timeout=5)
    assert e.value.code == 404
