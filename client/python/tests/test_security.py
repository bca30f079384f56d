"""TLS, mutual TLS, bearer tokens and tenants from the Python client, against live servers whose
certificates are made here by the openssl command line (as tests/integration/test_certs.cc does
for the C++ tests): only authenticated callers reach the API, each tenant in its own namespace of
sequence ids, and health stays reachable for probes on the plaintext health port."""
import shutil
import subprocess

import grpc
import numpy as np
import pytest

import kvbuffer
from kvbuffer import cli, reference
from helpers import Checked, activations, expect_close

pytestmark = pytest.mark.server

TOKEN_A = "kvb-py-test-token-aaaaaaaaaaaa"
TOKEN_B = "kvb-py-test-token-bbbbbbbbbbbb"


def _openssl(*args):
    r = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"openssl {' '.join(args[:2])}: {r.stderr}"


def _ca(d, name):
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.pem", "-days", "1",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _leaf(d, ca, name, cn, ext):
    base = f"{d}/{name}"
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{base}.key", "-out", f"{base}.csr", "-subj", f"/CN={cn}")
    with open(f"{base}.ext", "w") as f:
        f.write(ext)
    _openssl("x509", "-req", "-in", f"{base}.csr", "-CA", f"{d}/{ca}.pem", "-CAkey",
             f"{d}/{ca}.key", "-CAcreateserial", "-out", f"{base}.pem", "-days", "1",
             "-extfile", f"{base}.ext")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA, a server certificate for localhost/127.0.0.1, client certificates CN=tenant-a and
    CN=tenant-b, a client certificate from an unrelated CA, and a tokens file."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl command line not found (scripts/setup.sh installs it)")
    d = str(tmp_path_factory.mktemp("certs"))
    server_ext = ("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                  "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    client_ext = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n"
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _leaf(d, "ca", "server", "localhost", server_ext)
    _leaf(d, "ca", "client-a", "tenant-a", client_ext)
    _leaf(d, "ca", "client-b", "tenant-b", client_ext)
    _leaf(d, "rogue-ca", "rogue", "tenant-a", client_ext)
    with open(f"{d}/tokens", "w") as f:
        f.write(f"# token tenant\n{TOKEN_A} tenant-a\n{TOKEN_B} tenant-b\n")
    for name, token in (("a.token", TOKEN_A), ("b.token", TOKEN_B)):
        with open(f"{d}/{name}", "w") as f:
            f.write(token + "\n")
    return d


def tls_args(d, mutual=False):
    args = [f"--tls_cert={d}/server.pem", f"--tls_key={d}/server.key"]
    if mutual:
        args += [f"--tls_client_ca={d}/ca.pem", "--require_client_cert"]
    return args


def refused(fn, code):
    with pytest.raises(kvbuffer.KVBufferError) as e:
        fn()
    assert e.value.code == code, e.value
    return e.value


def prefill_and_decode(c, cfg, params, rng, seq_id=None):
    """Opens a sequence, prefills 6 tokens and decodes 2 on every layer, checking every output
    against the fp64 oracle; returns the Checked sequence (left open)."""
    s = Checked(cfg, params, seq_id)
    c.open_sequences([s.id])
    for layer in range(cfg.num_layers):
        (qkv, a, b), seen = activations(rng, cfg, 6)
        r = c.prefill(layer, [(s.id, s.position(layer), 6)], qkv, a, b)
        expect_close(r.output, s.oracle.append(layer, *seen), what=f"prefill layer {layer}")
    for _ in range(2):
        for layer in range(cfg.num_layers):
            (qkv, a, b), seen = activations(rng, cfg, 1)
            r = c.decode_step(layer, [(s.id, s.position(layer))], qkv, a, b)
            expect_close(r.output, s.oracle.append(layer, *seen), what=f"decode layer {layer}")
    return s


def model_of(c):
    cfg = reference.ModelConfig.from_server_info(c.get_server_info())
    return cfg, reference.make_all_layer_params(cfg)


def test_tls_serves_only_tls_clients_and_the_oracle_agrees(start_server, certs):
    server = start_server(tls_args(certs))
    with kvbuffer.Client(server.address, tls_ca=f"{certs}/ca.pem", timeout=10, retries=0) as c:
        info = c.get_server_info()
        assert "tls" in info.features and "reflection" in info.features  # no per-call auth
        cfg, params = model_of(c)
        s = prefill_and_decode(c, cfg, params, np.random.default_rng(1))
        with c.stream() as st:  # the same over a Stream on the TLS channel
            for layer in range(cfg.num_layers):
                (qkv, a, b), seen = activations(np.random.default_rng(2 + layer), cfg, 1)
                r = st.decode_step(layer, [(s.id, s.position(layer))], qkv, a, b)
                expect_close(r.output, s.oracle.append(layer, *seen), what="stream decode")
        c.close_sequences([s.id])
    # The certificate names localhost too; a name it does not carry is refused.
    port = server.port
    with kvbuffer.Client(f"localhost:{port}", tls_ca=f"{certs}/ca.pem", timeout=10,
                         retries=0) as c:
        assert c.get_server_info().backend == "cpu"
    with kvbuffer.Client(server.address, tls_ca=f"{certs}/ca.pem", tls_server_name="localhost",
                         timeout=10, retries=0) as c:
        assert c.get_server_info().backend == "cpu"
    for kw in ({}, {"tls_ca": f"{certs}/rogue-ca.pem"},
               {"tls_ca": f"{certs}/ca.pem", "tls_server_name": "other.example"}):
        with kvbuffer.Client(server.address, timeout=5, retries=0, **kw) as c:
            refused(c.get_server_info, grpc.StatusCode.UNAVAILABLE)


def test_mutual_tls_refuses_clients_without_a_verified_certificate(start_server, certs):
    server = start_server(tls_args(certs, mutual=True))
    ca = f"{certs}/ca.pem"
    with kvbuffer.Client(server.address, tls_ca=ca, tls_cert=f"{certs}/client-a.pem",
                         tls_key=f"{certs}/client-a.key", timeout=10, retries=0) as c:
        info = c.get_server_info()
        assert "mutual_tls" in info.features
        cfg, params = model_of(c)
        s = prefill_and_decode(c, cfg, params, np.random.default_rng(3))
        c.close_sequences([s.id])
    for kw in ({}, {"tls_cert": f"{certs}/rogue.pem", "tls_key": f"{certs}/rogue.key"}):
        with kvbuffer.Client(server.address, tls_ca=ca, timeout=5, retries=0, **kw) as c:
            refused(c.get_server_info, grpc.StatusCode.UNAVAILABLE)


def test_client_certificates_name_the_tenants(start_server, certs):
    server = start_server(tls_args(certs, mutual=True) + ["--tenant_from_client_cert"])
    ca = f"{certs}/ca.pem"
    a = kvbuffer.Client(server.address, tls_ca=ca, tls_cert=f"{certs}/client-a.pem",
                        tls_key=f"{certs}/client-a.key", timeout=10, retries=0)
    b = kvbuffer.Client(server.address, tls_ca=ca, tls_cert=f"{certs}/client-b.pem",
                        tls_key=f"{certs}/client-b.key", timeout=10, retries=0)
    with a, b:
        a.open_sequences([5])
        refused(lambda: b.close_sequences([5]), grpc.StatusCode.NOT_FOUND)
        b.open_sequences([5])  # the same id in b's own namespace
        assert a.get_server_info().capacity.open_sequences == 1
        a.close_sequences([5])
        b.close_sequences([5])


def test_tokens_tenants_and_the_plaintext_health_port(start_server, certs):
    server = start_server(tls_args(certs) + [f"--auth_tokens_file={certs}/tokens",
                                             "--health_port=0"])
    ca = f"{certs}/ca.pem"
    assert server.health_address, "\n".join(server.lines)
    # No token, an unknown token: UNAUTHENTICATED (the token is never echoed), unary and Stream.
    for token in (None, "kvb-py-test-token-cccccccccccc"):
        with kvbuffer.Client(server.address, tls_ca=ca, token=token, timeout=10,
                             retries=0) as c:
            e = refused(lambda: c.open_sequences([1]), grpc.StatusCode.UNAUTHENTICATED)
            assert "cccc" not in e.details
            with c.stream(retries=0) as st:
                refused(st.get_server_info, grpc.StatusCode.UNAUTHENTICATED)
            assert c.health("readiness") == "SERVING"  # health needs no token
    a = kvbuffer.Client(server.address, tls_ca=ca, token=TOKEN_A, timeout=10, retries=0)
    b = kvbuffer.Client(server.address, tls_ca=ca, token_file=f"{certs}/b.token", timeout=10,
                        retries=0)
    with a, b:
        info = a.get_server_info()
        assert "bearer_auth" in info.features and "reflection" not in info.features
        cfg, params = model_of(a)
        rng = np.random.default_rng(4)
        mine = prefill_and_decode(a, cfg, params, rng, seq_id=42)
        for layer in range(cfg.num_layers):
            (qkv, q_a, q_b), _ = activations(rng, cfg, 2)
            a.verify_drafts(layer, [(42, mine.position(layer), 2)], qkv, q_a, q_b)
        # Tenant b names a's sequence 42 in every call: NOT_FOUND each time, nothing changes.
        (qkv, q_a, q_b), _ = activations(rng, cfg, 1)
        pos = mine.position(0)
        for name, call in (
                ("decode", lambda: b.decode_step(0, [(42, pos)], qkv, q_a, q_b)),
                ("prefill", lambda: b.prefill(0, [(42, pos, 1)], qkv, q_a, q_b)),
                ("verify", lambda: b.verify_drafts(0, [(42, pos, 1)], qkv, q_a, q_b)),
                ("commit", lambda: b.commit_drafts([(42, pos, 1)])),
                ("flush", lambda: b.flush([42])),
                ("close", lambda: b.close_sequences([42]))):
            e = refused(call, grpc.StatusCode.NOT_FOUND)
            assert "42" in e.details, name
        with b.stream() as st:
            refused(lambda: st.close_sequences([42]), grpc.StatusCode.NOT_FOUND)
        # GetServerInfo counts each caller's own sequences.
        assert a.get_server_info().capacity.open_sequences == 1
        assert b.get_server_info().capacity.open_sequences == 0
        b.open_sequences([42, 43])
        assert b.get_server_info().capacity.open_sequences == 2
        assert a.get_server_info().capacity.open_sequences == 1
        # a's sequence is as a left it: the commit and the next decode still match the oracle.
        a.commit_drafts([(42, pos, 0)])
        for layer in range(cfg.num_layers):
            (qkv, q_a, q_b), seen = activations(rng, cfg, 1)
            r = a.decode_step(layer, [(42, mine.position(layer))], qkv, q_a, q_b)
            expect_close(r.output, mine.oracle.append(layer, *seen), what="decode after b")
        a.close_sequences([42])
        b.close_sequences([42, 43])
    # The plaintext health port answers probes without credentials and serves no API.
    with kvbuffer.Client(server.health_address, token=TOKEN_A, timeout=5, retries=0) as probe:
        for name in ("", kvbuffer.HEALTH_LIVENESS, kvbuffer.HEALTH_READINESS):
            assert probe.health(name) == "SERVING"
        refused(probe.get_server_info, grpc.StatusCode.UNIMPLEMENTED)


def test_cli_security_flags(start_server, certs, capsys):
    server = start_server(tls_args(certs) + [f"--auth_tokens_file={certs}/tokens",
                                             "--health_port=0"])
    base = ["--server", server.address, "--tls-ca", f"{certs}/ca.pem", "--timeout", "10"]
    assert cli.main(base + ["--token-file", f"{certs}/a.token", "info"]) == 0
    assert "bearer_auth" in capsys.readouterr().out
    assert cli.main(base + ["--token", TOKEN_B, "capacity", "--length", "100"]) == 0
    capsys.readouterr()
    assert cli.main(base + ["info"]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert cli.main(base + ["--token-file", f"{certs}/missing.token", "info"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert cli.main(["--server", server.address, "--token", TOKEN_A, "info"]) == 2  # plaintext
    capsys.readouterr()
    assert cli.main(["--server", server.health_address, "health"]) == 0  # probes: no credentials
    assert capsys.readouterr().out.count("SERVING") == 3


def test_security_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        kvbuffer.tls_credentials(cert="x.pem")
    with pytest.raises(ValueError, match="cannot read"):
        kvbuffer.Client("127.0.0.1:1", tls_ca=str(tmp_path / "nope.pem"))
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no token"):
        kvbuffer.read_token_file(str(empty))
    good = tmp_path / "good.token"
    good.write_text("  kvb-py-test-token-dddddddddddd  \nsecond line\n")
    assert kvbuffer.read_token_file(str(good)) == "kvb-py-test-token-dddddddddddd"
    with pytest.raises(ValueError, match="not both"):
        kvbuffer.Client("127.0.0.1:1", token="x" * 16, token_file=str(good))
    with kvbuffer.Client("127.0.0.1:1", token_file=str(good)) as c:
        assert ("authorization", "Bearer kvb-py-test-token-dddddddddddd") in c.metadata
        assert not c.secure
    with kvbuffer.Client("127.0.0.1:1", tls=True) as c:
        assert c.secure
