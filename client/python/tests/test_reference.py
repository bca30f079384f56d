"""The numpy oracle and the seeded parameters (no server needed)."""
import numpy as np
import pytest

from kvbuffer import reference
from kvbuffer.capacity import Layout


def f32(hex_text):
    return np.float32(float.fromhex(hex_text))


def test_params_match_cpp_layer_params_bit_for_bit():
    # Values printed by kernels/reference/layer_params.cc (MakeLayerParams, "%a").
    tiny = reference.ModelConfig.preset("tiny", param_seed=12345)
    p = reference.make_layer_params(tiny, 1)
    assert p.conv_weight.shape == (tiny.channels, 4)
    assert p.conv_weight.ravel()[0] == f32("-0x1.14a7f6p-2")
    assert p.conv_weight.ravel()[-1] == f32("0x1.488a76p-2")
    assert p.a_log[0] == f32("0x1.36e87p+1")
    assert p.dt_bias[-1] == f32("-0x1.2ff8f8p+2")
    small = reference.ModelConfig.preset("small", param_seed=12345)
    p = reference.make_layer_params(small, 3)
    assert p.conv_weight.ravel()[0] == f32("0x1.fa83f6p-3")
    assert p.conv_weight.ravel()[-1] == f32("-0x1.1ca7dp-4")
    assert p.a_log[0] == f32("0x1.0cd872p-3")
    assert p.dt_bias[-1] == f32("-0x1.a5791ap+1")
    qwen = reference.ModelConfig.preset("qwen3-next-80b-a3b", param_seed=1)
    p = reference.make_layer_params(qwen, 35)
    assert p.dt_bias[-1] == f32("-0x1.b32312p+2")
    assert p.conv_weight.ravel()[-1] == f32("-0x1.33f66ep-2")


def test_splitmix64_known_values():
    # SplitMix64 with seed 0: the reference sequence of the algorithm.
    out = reference.splitmix64_stream(0, 3)
    assert [int(x) for x in out] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def _naive(config, params, qkv, a, b):
    """Token-by-token textbook recurrence with explicit loops over heads."""
    H, HV, K, V, W = (config.num_k_heads, config.num_v_heads, config.head_k_dim,
                      config.head_v_dim, config.conv_width)
    T = qkv.shape[0]
    a, b = a.astype(np.float64), b.astype(np.float64)
    A_log, dt_bias = params.a_log.astype(np.float64), params.dt_bias.astype(np.float64)
    S = np.zeros((HV, K, V))
    rows = np.concatenate([np.zeros((W - 1, config.channels)), qkv.astype(np.float64)])
    w = params.conv_weight.astype(np.float64)
    out = np.zeros((T, HV, V))
    for t in range(T):
        x = sum(w[:, i] * rows[t + i] for i in range(W))
        x = x / (1 + np.exp(-x))
        for h in range(HV):
            kh = h // (HV // H)
            q = x[kh * K:(kh + 1) * K]
            k = x[H * K + kh * K:H * K + (kh + 1) * K]
            v = x[2 * H * K + h * V:2 * H * K + (h + 1) * V]
            q = q / np.sqrt(q @ q + 1e-6) / np.sqrt(K)
            k = k / np.sqrt(k @ k + 1e-6)
            sp = np.log1p(np.exp(a[t, h] + dt_bias[h]))
            g = -np.exp(A_log[h]) * sp
            beta = 1 / (1 + np.exp(-b[t, h]))
            S[h] = np.exp(g) * S[h]
            u = beta * (v - S[h].T @ k)
            S[h] = S[h] + np.outer(k, u)
            out[t, h] = S[h].T @ q
    return out, S


def test_oracle_matches_naive_loops_and_chunking():
    cfg = reference.ModelConfig.preset("tiny", param_seed=7)
    params = reference.make_all_layer_params(cfg)
    rng = np.random.default_rng(0)
    qkv, a, b = reference.random_activations(rng, cfg, 11)
    want, S = _naive(cfg, params[1], qkv, a, b)
    seq = reference.OracleSequence(cfg, params)
    got = np.concatenate([seq.append(1, qkv[:3], a[:3], b[:3]),
                          seq.append(1, qkv[3:4], a[3:4], b[3:4]),
                          seq.append(1, qkv[4:], a[4:], b[4:])])
    assert np.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.allclose(seq.state(1), S, rtol=1e-12, atol=1e-12)
    assert seq.position(1) == 11 and seq.position(0) == 0


def test_oracle_copy_is_independent():
    cfg = reference.ModelConfig.preset("tiny")
    params = reference.make_all_layer_params(cfg)
    rng = np.random.default_rng(1)
    seq = reference.OracleSequence(cfg, params)
    seq.append(0, *reference.random_activations(rng, cfg, 5))
    draft = seq.copy()
    x = reference.random_activations(rng, cfg, 2)
    o1 = draft.append(0, *x)
    assert seq.position(0) == 5 and draft.position(0) == 7
    o2 = seq.append(0, *x)
    assert np.array_equal(o1, o2)


def test_relative_error():
    assert reference.relative_error([1.0, 2.0], np.array([1.0, 2.0])) == 0.0
    assert reference.relative_error([np.nan, 1], np.array([1.0, 1.0])) == float("inf")
    with pytest.raises(ValueError):
        reference.relative_error([1.0], np.array([1.0, 2.0]))


def test_capacity_formula_qwen3_next():
    lay = Layout(num_layers=36, num_k_heads=16, num_v_heads=32, head_k_dim=128, head_v_dim=128,
                 conv_width=4, flush_interval=16, stateless_limit=64, max_drafts=16,
                 page_tokens=16)
    assert lay.channels == 8192
    assert lay.state_slot == 36 * 32 * 128 * 128 * 4 == 75_497_472
    assert lay.buffer_row == (16 * 128 + 32 * 128) * 4 + 32 * 4 == 24_704
    assert lay.buffer_page == 16 * 36 * 24_704
    assert lay.conv_slot == 36 * (3 + 16) * 8192 * 4
    # Short sequence: no state, buffer pages for its tokens only.
    assert not lay.has_state(40)
    assert lay.kvbuffer_bytes(40) == 3 * lay.buffer_page + lay.conv_slot
    # Long sequence: state + one page (C = 16 rows) + conv window; recurrent with 4 drafts keeps 5.
    assert lay.kvbuffer_bytes(32768, 4) == lay.state_slot + lay.buffer_page + lay.conv_slot
    assert lay.recurrent_bytes(32768, 4) == 5 * (lay.state_slot + 36 * 3 * 8192 * 4)
    assert lay.recurrent_bytes(32768, 4) / lay.kvbuffer_bytes(32768, 4) > 3
