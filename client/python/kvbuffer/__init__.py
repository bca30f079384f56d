"""Python client of KVBuffer, the linear-attention (Gated DeltaNet) service.

    import kvbuffer
    client = kvbuffer.Client("127.0.0.1:50051")
    secure = kvbuffer.Client("kvb-0:50051", tls_ca="ca.pem", token_file="my.token")  # TLS + token
    routed = kvbuffer.RoutedClient(["10.0.0.1:50051", "10.0.0.2:50051"])   # past one host

See kvbuffer.client (operations), kvbuffer.routing (consistent hashing), kvbuffer.reference (fp64
numpy oracle and the seeded layer parameters), kvbuffer.capacity (memory per sequence) and
`kvbuffer-cli --help`.
"""
from kvbuffer._proto import pb
from kvbuffer.client import (KVBufferError, LayerResult, Client, Seq, StreamSession,
                             RETRYABLE, read_token_file, tls_credentials)
from kvbuffer.routing import HashRing, ReplicaErrors, RoutedClient, resolve_dns, \
    statefulset_addresses
from kvbuffer.tensors import BF16, FP16, FP32

__version__ = "0.1.0"

# grpc.health.v1 service names the server reports (DESIGN §5: separate liveness and readiness).
# "" is the whole server. Kubernetes probes in deploy/ use the same names.
HEALTH_LIVENESS = "liveness"
HEALTH_READINESS = "readiness"

__all__ = [
    "pb", "Client", "StreamSession", "KVBufferError", "LayerResult", "Seq", "RETRYABLE",
    "read_token_file", "tls_credentials",
    "HashRing", "RoutedClient", "ReplicaErrors", "resolve_dns", "statefulset_addresses",
    "FP32", "FP16", "BF16", "HEALTH_LIVENESS", "HEALTH_READINESS", "__version__",
]
