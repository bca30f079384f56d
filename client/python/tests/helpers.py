"""Test helpers: sequences checked against the fp64 numpy oracle."""
from __future__ import annotations

import itertools

import numpy as np

from kvbuffer import reference, tensors

FP32_TOL = 1e-3   # fp32 service math vs fp64 oracle (relative, per call)
BF16_OUT_TOL = 2e-2

_ids = itertools.count(1000)


def new_id() -> int:
    return next(_ids)


class Checked:
    """A sequence on the server plus its fp64 oracle (on the values the server received)."""

    def __init__(self, config: reference.ModelConfig, params, seq_id: int | None = None):
        self.id = new_id() if seq_id is None else seq_id
        self.oracle = reference.OracleSequence(config, params)
        self.config = config
        self.pending = None  # (position, [per-layer (qkv, a, b)]) of verified drafts

    def position(self, layer: int) -> int:
        return self.oracle.position(layer)


def activations(rng, config, n, dtype=tensors.FP32):
    """Random activations in the wire dtype and the float values the server will see."""
    qkv, a, b = reference.random_activations(rng, config, n)
    if dtype == tensors.FP16:
        qkv, a, b = (x.astype(np.float16) for x in (qkv, a, b))
    seen = tuple(tensors.wire_values(x, dtype) for x in (qkv, a, b))
    if dtype == tensors.BF16:
        return (qkv, a, b), seen  # sent with input_dtype="bf16" (rounded on the way)
    return (qkv, a, b), seen


def expect_close(got, want, tol=FP32_TOL, what=""):
    err = reference.relative_error(np.asarray(got, dtype=np.float64), want)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"
    return err
