"""Consistent hashing (no server needed). The golden values are shared with
client/cpp/replica_router_test.cc so both clients route every sequence to the same replica."""
import collections

from kvbuffer import routing

THREE = ["kvbuffer-0.kvbuffer:50051", "kvbuffer-1.kvbuffer:50051", "kvbuffer-2.kvbuffer:50051"]


def test_hashes_match_the_shared_contract():
    assert routing.fnv1a64(b"") == 0xCBF29CE484222325
    assert routing.fnv1a64(THREE[0].encode()) == 0x6FA29DAF7A068D17
    assert routing.key_hash(0) == 0xE220A8397B1DCDAF
    assert routing.key_hash(42) == 0xBDD732262FEB6E95
    assert routing.replica_points("a:1", 1)[0] == 0xD097563B758A8CE2
    ring = routing.HashRing(THREE)
    want = "012100102100011110121120"
    assert "".join(str(THREE.index(ring.route(i))) for i in range(len(want))) == want


def test_stable_order_independent_and_balanced():
    a = routing.HashRing(THREE)
    b = routing.HashRing(reversed(THREE + [THREE[0]]))
    assert len(b) == 3
    assert all(a.route(i) == b.route(i) for i in range(3000))
    eight = routing.HashRing([f"10.0.0.{i}:50051" for i in range(1, 9)])
    c = collections.Counter(eight.route(i * 7919 + 13) for i in range(40000))
    assert len(c) == 8 and all(3750 < n < 6250 for n in c.values())


def test_minimal_movement_on_leave_and_join():
    ring = routing.HashRing(THREE)
    before = [ring.route(i) for i in range(6000)]
    ring.remove(THREE[1])
    after = [ring.route(i) for i in range(6000)]
    moved = [i for i in range(6000) if before[i] != after[i]]
    assert all(before[i] == THREE[1] for i in moved)
    assert len(moved) == before.count(THREE[1])
    ring.add("kvbuffer-3.kvbuffer:50051")
    again = [ring.route(i) for i in range(6000)]
    assert all(again[i] == after[i] or again[i] == "kvbuffer-3.kvbuffer:50051"
               for i in range(6000))
    ring.set_replicas(THREE)
    assert [ring.route(i) for i in range(6000)] == before


def test_partition_keeps_order():
    ring = routing.HashRing(THREE)
    ids = list(range(500, 0, -7))
    groups = ring.partition(ids)
    assert sorted(x for g in groups.values() for x in g) == sorted(ids)
    for r, g in groups.items():
        assert g == [i for i in ids if ring.route(i) == r]


def test_addresses_from_statefulset_and_dns():
    assert routing.statefulset_addresses("kvbuffer", "kvbuffer", 2, 50051, "prod") == [
        "kvbuffer-0.kvbuffer.prod.svc.cluster.local:50051",
        "kvbuffer-1.kvbuffer.prod.svc.cluster.local:50051"]
    assert routing.statefulset_addresses("kv", "kvh", 1, 1) == ["kv-0.kvh:1"]
    addrs = routing.resolve_dns("localhost", 50051)
    assert addrs and all(a.endswith(":50051") for a in addrs)
    assert routing.parse_replicas("a:1, b:2") == ["a:1", "b:2"]
    assert "127.0.0.1:7" in routing.parse_replicas("dns:///localhost:7")
