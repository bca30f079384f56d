"""Generated protobuf/gRPC modules of the wire contract kvbuffer.v1 (made at build time)."""
