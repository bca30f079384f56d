"""Client-side consistent hashing over three live servers, including one going away."""
import grpc
import numpy as np
import pytest

import kvbuffer
from kvbuffer import reference
from helpers import Checked, activations, expect_close

pytestmark = pytest.mark.server


def decode_all(router, cfg, seqs, rng, check=True):
    for layer in range(cfg.num_layers):
        (qkv, a, b), seen = activations(rng, cfg, len(seqs))
        r = router.decode_step(layer, [(s.id, s.position(layer)) for s in seqs], qkv, a, b)
        for i, s in enumerate(seqs):
            want = s.oracle.append(layer, *(v[i:i + 1] for v in seen))
            if check:
                expect_close(r.output[i:i + 1], want, 1e-3, f"routed decode {s.id}")
        assert r.positions == [s.position(layer) for s in seqs]


def test_three_replicas_and_one_going_away(start_server):
    servers = [start_server() for _ in range(3)]
    addrs = [s.address for s in servers]
    with kvbuffer.RoutedClient(addrs, timeout=10, retries=1, backoff=0.01) as router:
        infos = router.get_server_info()
        assert set(infos) == set(addrs)
        cfg = reference.ModelConfig.from_server_info(next(iter(infos.values())))
        params = reference.make_all_layer_params(cfg)
        rng = np.random.default_rng(41)
        seqs = [Checked(cfg, params) for _ in range(18)]
        router.open_sequences([s.id for s in seqs])
        owner = {s.id: router.replica_for(s.id) for s in seqs}
        assert len(set(owner.values())) == 3, "18 ids should land on all three replicas"
        for addr in addrs:  # each replica holds exactly the sequences routed to it
            n = router.client(addr).get_server_info().capacity.open_sequences
            assert n == sum(1 for o in owner.values() if o == addr)
        # Batched prefill across replicas: outputs come back in the caller's order.
        for layer in range(cfg.num_layers):
            lens = [1 + (i % 5) for i in range(len(seqs))]
            (qkv, a, b), seen = activations(rng, cfg, sum(lens))
            r = router.prefill(layer, [(s.id, 0, n) for s, n in zip(seqs, lens)], qkv, a, b)
            off = 0
            for s, n in zip(seqs, lens):
                expect_close(r.output[off:off + n],
                             s.oracle.append(layer, *(v[off:off + n] for v in seen)), 1e-3,
                             "routed prefill")
                off += n
        decode_all(router, cfg, seqs, rng)
        health = router.health(kvbuffer.HEALTH_READINESS)
        assert set(health.values()) == {"SERVING"}

        # Replica 1 dies without draining.
        gone = addrs[1]
        servers[1].kill()
        lost = [s for s in seqs if owner[s.id] == gone]
        kept = [s for s in seqs if owner[s.id] != gone]
        assert lost and kept
        # A batch over every replica: the dead one's sequences fail with UNAVAILABLE, the others
        # are served (and their outputs are in e.results).
        (qkv, a, b), seen = activations(rng, cfg, len(seqs))
        with pytest.raises(kvbuffer.ReplicaErrors) as e:
            router.decode_step(0, [(s.id, s.position(0)) for s in seqs], qkv, a, b)
        assert set(e.value.errors) == {gone}
        assert e.value.errors[gone].code == grpc.StatusCode.UNAVAILABLE
        assert sorted(e.value.failed_ids) == sorted(s.id for s in lost)
        assert set(e.value.results) == set(addrs) - {gone}
        for addr, res in e.value.results.items():
            mine = [i for i, s in enumerate(seqs) if owner[s.id] == addr]
            for k, i in enumerate(mine):
                want = seqs[i].oracle.append(0, *(v[i:i + 1] for v in seen))
                expect_close(res.output[k:k + 1], want, 1e-3, "partial batch")
        # The sequences of the live replicas continue, checked against the oracle.
        for layer in range(1, cfg.num_layers):  # finish the step on the other layers
            (qkv, a, b), seen = activations(rng, cfg, len(kept))
            r = router.decode_step(layer, [(s.id, s.position(layer)) for s in kept], qkv, a, b)
            for i, s in enumerate(kept):
                expect_close(r.output[i:i + 1], s.oracle.append(layer, *(v[i:i + 1] for v in seen)),
                             1e-3, "after loss")
        for _ in range(3):
            decode_all(router, cfg, kept, rng)
        health = router.health(kvbuffer.HEALTH_LIVENESS)
        assert health[gone] == "UNAVAILABLE" and all(
            v == "SERVING" for k, v in health.items() if k != gone)

        # The operator (or a DNS refresh) drops the replica from the ring: only its sequences
        # move, and the replica they move to does not know them (NOT_FOUND).
        router.remove_replica(gone)
        assert all(router.replica_for(s.id) == owner[s.id] for s in kept)
        with pytest.raises(kvbuffer.ReplicaErrors) as e:
            router.flush([s.id for s in lost])
        assert {x.code for x in e.value.errors.values()} == {grpc.StatusCode.NOT_FOUND}
        router.flush([s.id for s in kept])
        router.close_sequences([s.id for s in kept])
