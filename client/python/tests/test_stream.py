"""The Stream session: the same operations in order on one bidirectional stream."""
import grpc
import numpy as np
import pytest

import kvbuffer
from kvbuffer import reference
from helpers import Checked, activations, expect_close, new_id

pytestmark = pytest.mark.server


def test_stream_session_full_flow(client):
    info = client.get_server_info()
    cfg = reference.ModelConfig.from_server_info(info)
    params = reference.make_all_layer_params(cfg)
    rng = np.random.default_rng(21)
    seqs = [Checked(cfg, params) for _ in range(3)]
    with client.stream() as st:
        assert st.get_server_info().model.name == cfg.name
        st.open_sequences([s.id for s in seqs])
        for layer in range(cfg.num_layers):  # prefill
            lens = [3, 9, 1]
            (qkv, a, b), seen = activations(rng, cfg, sum(lens))
            r = st.prefill(layer, [(s.id, 0, n) for s, n in zip(seqs, lens)], qkv, a, b)
            off = 0
            for s, n in zip(seqs, lens):
                want = s.oracle.append(layer, *(v[off:off + n] for v in seen))
                expect_close(r.output[off:off + n], want, 1e-3, "stream prefill")
                off += n
        for _ in range(6):  # decode, layer by layer
            for layer in range(cfg.num_layers):
                (qkv, a, b), seen = activations(rng, cfg, 3)
                r = st.decode_step(layer, [(s.id, s.position(layer)) for s in seqs], qkv, a, b)
                for i, s in enumerate(seqs):
                    want = s.oracle.append(layer, *(v[i:i + 1] for v in seen))
                    expect_close(r.output[i:i + 1], want, 1e-3, "stream decode")
        # Errors come back per call; the stream stays usable.
        with pytest.raises(kvbuffer.KVBufferError) as e:
            st.flush([new_id()])
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(kvbuffer.KVBufferError) as e:
            (qkv, a, b), _ = activations(rng, cfg, 1)
            st.decode_step(0, [(seqs[0].id, seqs[0].position(0) + 3)], qkv, a, b)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        # Drafts on the stream, then commit.
        drafts = 2
        kept = []
        for layer in range(cfg.num_layers):
            (qkv, a, b), seen = activations(rng, cfg, drafts)
            r = st.verify_drafts(layer, [(seqs[1].id, seqs[1].position(layer), drafts)], qkv, a, b)
            expect_close(r.output, seqs[1].oracle.copy().append(layer, *seen), 1e-3, "verify")
            kept.append(seen)
        st.commit_drafts([(seqs[1].id, seqs[1].position(0), 1)])
        for layer in range(cfg.num_layers):
            seqs[1].oracle.append(layer, *(v[:1] for v in kept[layer]))
        st.flush([s.id for s in seqs])
        # Pipelined: several calls in flight, answers in order.
        rids = []
        expected = []
        for layer in range(cfg.num_layers):
            (qkv, a, b), seen = activations(rng, cfg, 1)
            req = kvbuffer.client.layer_request(
                "DecodeStepRequest", layer, [(seqs[2].id, seqs[2].position(layer))], qkv, a, b,
                default_tokens=1)
            rids.append(st.submit("decode_step", req))
            expected.append(seqs[2].oracle.append(layer, *seen))
        for rid, want in zip(rids, expected):
            out = kvbuffer.tensors.tensor_to_numpy(st.wait(rid).output)
            expect_close(out, want, 1e-3, "pipelined")
        st.close_sequences([s.id for s in seqs])


def test_stream_reconnects_after_server_restart(start_server):
    """A broken stream (UNAVAILABLE) is reopened and the unanswered call resent."""
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    first = start_server([f"--port={port}"])
    with kvbuffer.Client(first.address, timeout=10, retries=5, backoff=0.05) as c:
        st = c.stream(retries=8)
        assert st.get_server_info().backend == "cpu"
        first.kill()
        second = None
        for _ in range(50):  # the port may take a moment to become free again
            try:
                second = start_server([f"--port={port}"])
                break
            except RuntimeError:
                time.sleep(0.1)
        assert second is not None
        assert st.get_server_info().backend == "cpu"  # same session object, new stream
        st.close()
