"""Every operation against a live kvbuffer-server (CPU backend, tiny model), outputs checked
against the fp64 numpy oracle; status codes of the errors; retries and replays; deadlines."""
import grpc
import numpy as np
import pytest

import kvbuffer
from kvbuffer import reference, tensors
from kvbuffer.capacity import Layout
from helpers import BF16_OUT_TOL, Checked, activations, expect_close, new_id

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def model(server):
    with kvbuffer.Client(server.address) as c:
        info = c.get_server_info()
    cfg = reference.ModelConfig.from_server_info(info)
    return cfg, reference.make_all_layer_params(cfg), info


def codes(excinfo):
    return excinfo.value.code


def test_server_info(client, model):
    cfg, _, _ = model
    info = client.get_server_info([(100, 2), (4, 0)])
    assert info.backend == "cpu"
    assert info.model.name == "tiny" and cfg.num_layers == 2 and cfg.num_v_heads == 4
    assert info.model.channels == cfg.channels == 2 * 2 * 16 + 4 * 16
    assert info.buffer.flush_interval == 4 and info.buffer.stateless_limit == 8
    assert info.buffer.max_drafts == 4 and info.buffer.page_tokens == 4
    assert info.capacity.max_sequences == 24 and info.capacity.state_slots == 16
    assert info.capacity.buffer_pages == 96
    assert info.version
    est = {(e.length, e.drafts): e for e in info.capacity.estimates}
    assert (100, 2) in est and (4, 0) in est
    lay = Layout.from_server_info(info)
    assert est[(100, 2)].kvbuffer_bytes_per_sequence == lay.kvbuffer_bytes(100, 2)
    assert est[(100, 2)].recurrent_bytes_per_sequence == lay.recurrent_bytes(100, 2)
    assert est[(4, 0)].kvbuffer_bytes_per_sequence == lay.kvbuffer_bytes(4, 0)
    assert info.capacity.state_slot_bytes == lay.state_slot
    assert info.capacity.buffer_page_bytes == lay.buffer_page
    assert info.capacity.conv_slot_bytes == lay.conv_slot


def test_health(client):
    assert client.health("") == "SERVING"
    assert client.health(kvbuffer.HEALTH_LIVENESS) == "SERVING"
    assert client.health(kvbuffer.HEALTH_READINESS) == "SERVING"
    assert client.health("no.such.Service") == "SERVICE_UNKNOWN"


def test_open_close_errors(client):
    ids = [new_id(), new_id()]
    client.open_sequences(ids)
    with pytest.raises(kvbuffer.KVBufferError) as e:
        client.open_sequences([ids[1], new_id()])
    assert codes(e) == grpc.StatusCode.ALREADY_EXISTS
    client.close_sequences(ids)
    with pytest.raises(kvbuffer.KVBufferError) as e:
        client.close_sequences([ids[0]])
    assert codes(e) == grpc.StatusCode.NOT_FOUND


def run_layers(client, model, seqs, lengths, rng, op="prefill", dtype=tensors.FP32,
               output_dtype=None, tol=None):
    """One batched call per layer for `seqs` with lengths[i] tokens each; checks every output."""
    cfg, params, _ = model
    for layer in range(cfg.num_layers):
        (qkv, a, b), seen = activations(rng, cfg, sum(lengths), dtype)
        spec = [(s.id, s.position(layer), n) for s, n in zip(seqs, lengths)]
        fn = getattr(client, op)
        r = fn(layer, spec, qkv, a, b, input_dtype=dtype, output_dtype=output_dtype)
        assert r.output.shape == (sum(lengths), cfg.num_v_heads, cfg.head_v_dim)
        assert not r.replayed
        off = 0
        for s, n in zip(seqs, lengths):
            want = s.oracle.append(layer, seen[0][off:off + n], seen[1][off:off + n],
                                   seen[2][off:off + n])
            expect_close(r.output[off:off + n], want,
                         tol or (BF16_OUT_TOL if output_dtype == "bf16" else 1e-3),
                         f"{op} layer {layer} seq {s.id}")
            off += n
        assert r.positions == [s.position(layer) for s in seqs]


def test_prefill_decode_flush_numerics(client, model):
    cfg, params, _ = model
    rng = np.random.default_rng(11)
    seqs = [Checked(cfg, params) for _ in range(4)]
    client.open_sequences([s.id for s in seqs])
    try:
        # Varied prompt lengths: under the stateless limit, at it, across flushes, long chunked.
        run_layers(client, model, seqs, [1, 5, 8, 70], rng, "prefill")
        for step in range(9):  # decodes cross several flush intervals (C = 4)
            run_layers(client, model, seqs, [1] * 4, rng, "decode_step")
            if step == 4:
                client.flush([seqs[0].id, seqs[1].id])
        run_layers(client, model, seqs[:2], [3, 6], rng, "prefill")  # prefill after decode
        run_layers(client, model, seqs, [1] * 4, rng, "decode_step")
    finally:
        client.close_sequences([s.id for s in seqs])


@pytest.mark.parametrize("dtype,out", [("fp16", None), ("bf16", None), ("fp32", "bf16"),
                                       ("fp32", "fp16")])
def test_dtypes(client, model, dtype, out):
    cfg, params, _ = model
    rng = np.random.default_rng(12)
    seqs = [Checked(cfg, params) for _ in range(2)]
    client.open_sequences([s.id for s in seqs])
    try:
        tol = 2e-2 if out in ("bf16", "fp16") or dtype == "bf16" else 2e-3
        run_layers(client, model, seqs, [6, 3], rng, "prefill", dtype, out, tol)
        run_layers(client, model, seqs, [1, 1], rng, "decode_step", dtype, out, tol)
        (qkv, a, b), _ = activations(rng, cfg, 1, dtype)
        r = client.decode_step(0, [(seqs[0].id, seqs[0].position(0))], qkv, a, b,
                               input_dtype=dtype, output_dtype=out, bf16_bits=True)
        want = {None: {"fp16": np.float16, "bf16": np.uint16, "fp32": np.float32}[dtype],
                "bf16": np.uint16, "fp16": np.float16}[out]
        assert r.output.dtype == want
    finally:
        client.close_sequences([s.id for s in seqs])


def test_verify_and_commit_drafts(client, model):
    cfg, params, _ = model
    rng = np.random.default_rng(13)
    seqs = [Checked(cfg, params) for _ in range(3)]
    client.open_sequences([s.id for s in seqs])
    try:
        run_layers(client, model, seqs, [2, 7, 12], rng, "prefill")
        for rnd, (drafts, accept) in enumerate([([3, 4, 1], [0, 4, 1]), ([4, 2, 4], [2, 1, 0]),
                                                ([1, 1, 1], [1, 0, 1]), ([4, 4, 4], [3, 4, 2])]):
            inputs = []
            for layer in range(cfg.num_layers):
                (qkv, a, b), seen = activations(rng, cfg, sum(drafts))
                spec = [(s.id, s.position(layer), m) for s, m in zip(seqs, drafts)]
                r = client.verify_drafts(layer, spec, qkv, a, b)
                off = 0
                per = []
                for s, m in zip(seqs, drafts):
                    x = tuple(v[off:off + m] for v in seen)
                    want = s.oracle.copy().append(layer, *x)
                    expect_close(r.output[off:off + m], want, 1e-3, f"verify round {rnd}")
                    per.append(x)
                    off += m
                # Drafts are tentative: committed positions do not move.
                assert r.positions == [s.position(layer) for s in seqs]
                inputs.append(per)
            client.commit_drafts([(s.id, s.position(0), acc) for s, acc in zip(seqs, accept)])
            for layer in range(cfg.num_layers):
                for i, (s, acc) in enumerate(zip(seqs, accept)):
                    if acc:
                        s.oracle.append(layer, *(v[:acc] for v in inputs[layer][i]))
            run_layers(client, model, seqs, [1, 1, 1], rng, "decode_step")
        # Over-commit: more drafts than were verified.
        for layer in range(cfg.num_layers):
            (qkv, a, b), _ = activations(rng, cfg, 2)
            client.verify_drafts(layer, [(seqs[0].id, seqs[0].position(layer), 2)], qkv, a, b)
        with pytest.raises(kvbuffer.KVBufferError) as e:
            client.commit_drafts([(seqs[0].id, seqs[0].position(0), 3)])
        assert codes(e) == grpc.StatusCode.OUT_OF_RANGE
    finally:
        client.close_sequences([s.id for s in seqs])


def test_retry_is_a_replay(client, model):
    cfg, params, _ = model
    rng = np.random.default_rng(14)
    s = Checked(cfg, params)
    client.open_sequences([s.id])
    try:
        run_layers(client, model, [s], [5], rng, "prefill")
        (qkv, a, b), seen = activations(rng, cfg, 1)
        pos = s.position(0)
        r1 = client.decode_step(0, [(s.id, pos)], qkv, a, b)
        r2 = client.decode_step(0, [(s.id, pos)], qkv, a, b)  # the same request again
        assert not r1.replayed and r2.replayed
        assert np.array_equal(r1.output, r2.output)
        assert r1.positions == r2.positions == [pos + 1]
        expect_close(r1.output, s.oracle.append(0, *seen), 1e-3, "decode")
        # A stale position that is not a replay of the last call, and a future one.
        with pytest.raises(kvbuffer.KVBufferError) as e:
            client.decode_step(0, [(s.id, pos + 5)], qkv, a, b)
        assert codes(e) == grpc.StatusCode.FAILED_PRECONDITION
        assert str(pos + 5) in e.value.details and str(pos + 1) in e.value.details
    finally:
        client.close_sequences([s.id])


def test_invalid_requests(client, model):
    cfg, params, info = model
    rng = np.random.default_rng(15)
    s = Checked(cfg, params)
    client.open_sequences([s.id])
    try:
        (qkv, a, b), _ = activations(rng, cfg, 2)

        def expect(code, fn):
            with pytest.raises(kvbuffer.KVBufferError) as e:
                fn()
            assert e.value.code == code, e.value
            return e.value

        expect(grpc.StatusCode.INVALID_ARGUMENT,
               lambda: client.prefill(cfg.num_layers, [(s.id, 0, 2)], qkv, a, b))  # bad layer
        expect(grpc.StatusCode.INVALID_ARGUMENT,
               lambda: client.prefill(0, [(s.id, 0, 2)], qkv[:, :-1], a, b))       # bad channels
        expect(grpc.StatusCode.INVALID_ARGUMENT,
               lambda: client.verify_drafts(0, [(s.id, 0, info.buffer.max_drafts + 1)],
                                            *activations(rng, cfg, info.buffer.max_drafts + 1)[0]))
        expect(grpc.StatusCode.NOT_FOUND,
               lambda: client.prefill(0, [(new_id(), 0, 2)], qkv, a, b))
        expect(grpc.StatusCode.NOT_FOUND, lambda: client.flush([new_id()]))
        expect(grpc.StatusCode.NOT_FOUND, lambda: client.commit_drafts([(new_id(), 0, 0)]))
        # All-or-nothing: a batch with one unknown sequence changes no sequence.
        expect(grpc.StatusCode.NOT_FOUND,
               lambda: client.prefill(0, [(s.id, 0, 1), (new_id(), 0, 1)], qkv, a, b))
        run_layers(client, model, [s], [2], rng, "prefill")  # still at position 0
    finally:
        client.close_sequences([s.id])


def test_pool_exhaustion_is_resource_exhausted(client, model):
    _, _, info = model
    free = info.capacity.max_sequences - client.get_server_info().capacity.open_sequences
    ids = [new_id() for _ in range(free)]
    client.open_sequences(ids)
    try:
        with pytest.raises(kvbuffer.KVBufferError) as e:
            client.open_sequences([new_id()])
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.get_server_info().capacity.open_sequences == info.capacity.max_sequences
    finally:
        client.close_sequences(ids)


def test_deadline_exceeded_after_retries(server):
    with kvbuffer.Client(server.address, timeout=-1, retries=2, backoff=0.001) as c:
        with pytest.raises(kvbuffer.KVBufferError) as e:
            c.get_server_info()  # an expired deadline: retried, then reported
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        # A per-call deadline overrides the client's default.
        assert c.get_server_info(timeout=10).backend == "cpu"


def test_deadline_then_retry_is_exactly_once(server, model):
    """A long prefill under a deadline too short for it, retried with the same request: whether
    or not the server applied it before the deadline, the sequence ends up with it exactly once."""
    cfg, params, _ = model
    rng = np.random.default_rng(17)
    s = Checked(cfg, params)
    (qkv, a, b), seen = activations(rng, cfg, 1500)
    with kvbuffer.Client(server.address, timeout=0.0005, retries=2, backoff=0.0) as hurried, \
            kvbuffer.Client(server.address, timeout=30) as patient:
        patient.open_sequences([s.id])
        try:
            try:
                hurried.prefill(0, [(s.id, 0, 1500)], qkv, a, b)
            except kvbuffer.KVBufferError as e:
                assert e.code == grpc.StatusCode.DEADLINE_EXCEEDED, e
            r = patient.prefill(0, [(s.id, 0, 1500)], qkv, a, b)  # the retry, given time
            assert r.positions == [1500]
            expect_close(r.output, s.oracle.append(0, *seen), 1e-3, "prefill after deadline")
            (q1, a1, b1), seen1 = activations(rng, cfg, 1)
            r = patient.decode_step(0, [(s.id, 1500)], q1, a1, b1)
            expect_close(r.output, s.oracle.append(0, *seen1), 1e-3, "decode after retry")
        finally:
            patient.close_sequences([s.id])


def test_unreachable_server_is_unavailable():
    with kvbuffer.Client("127.0.0.1:1", timeout=2, retries=1, backoff=0.001) as c:
        with pytest.raises(kvbuffer.KVBufferError) as e:
            c.get_server_info()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_torch_in_torch_out(client, model):
    torch = pytest.importorskip("torch")
    cfg, params, _ = model
    rng = np.random.default_rng(16)
    s = Checked(cfg, params)
    client.open_sequences([s.id])
    try:
        (qkv, a, b), _ = activations(rng, cfg, 3)
        tq, ta, tb = (torch.from_numpy(x).to(torch.bfloat16) for x in (qkv, a, b))
        r = client.prefill(0, [(s.id, 0, 3)], tq, ta, tb, output_dtype="bf16")
        assert isinstance(r.output, torch.Tensor) and r.output.dtype == torch.bfloat16
        seen = [tensors.round_to(x, "bf16") for x in (qkv, a, b)]
        expect_close(r.output.float().numpy(), s.oracle.append(0, *seen), BF16_OUT_TOL, "torch")
    finally:
        client.close_sequences([s.id])
