"""numpy reference of one Gated DeltaNet layer in fp64 (shared/DESIGN.md §2) and the layer
parameter generator, bit-for-bit as kernels/reference/layer_params.cc draws them.

    x_t  = SiLU(sum_i w[:, i] * qkv_{t-W+1+i})      causal depthwise conv, zero history at start
    q^   = q / sqrt(|q|^2 + 1e-6) * K^-1/2,  k^ = k / sqrt(|k|^2 + 1e-6)
    g_t  = -exp(A_log) * softplus(a_t + dt_bias),  beta_t = sigmoid(b_t)
    S~   = e^{g_t} S_{t-1};  u_t = beta_t (v_t - S~^T k^_t);  S_t = S~ + k^_t u_t^T;  o_t = S_t^T q^_t

Use it to check the service: feed it the float values the server received (see
kvbuffer.tensors.wire_values) and compare with relative_error.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

_GAMMA = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1

PRESETS = {
    "qwen3-next-80b-a3b": dict(num_layers=36, num_k_heads=16, num_v_heads=32, head_k_dim=128,
                               head_v_dim=128, conv_width=4),
    "small": dict(num_layers=4, num_k_heads=4, num_v_heads=8, head_k_dim=32, head_v_dim=32,
                  conv_width=4),
    "tiny": dict(num_layers=2, num_k_heads=2, num_v_heads=4, head_k_dim=16, head_v_dim=16,
                 conv_width=4),
}


@dataclass
class ModelConfig:
    """Shapes of the linear-attention layers (kernels/reference/model_config.h)."""
    name: str = "tiny"
    num_layers: int = 2
    num_k_heads: int = 2
    num_v_heads: int = 4
    head_k_dim: int = 16
    head_v_dim: int = 16
    conv_width: int = 4
    param_seed: int = 1

    @property
    def channels(self) -> int:
        return 2 * self.num_k_heads * self.head_k_dim + self.num_v_heads * self.head_v_dim

    @property
    def group_size(self) -> int:
        return self.num_v_heads // self.num_k_heads

    @classmethod
    def preset(cls, name: str, param_seed: int = 1) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls(name=name, param_seed=param_seed, **PRESETS[name])

    @classmethod
    def from_server_info(cls, info) -> "ModelConfig":
        """From a GetServerInfoResponse (or its ModelShapes)."""
        m = info.model if hasattr(info, "model") else info
        return cls(name=m.name, num_layers=m.num_layers, num_k_heads=m.num_k_heads,
                   num_v_heads=m.num_v_heads, head_k_dim=m.head_k_dim, head_v_dim=m.head_v_dim,
                   conv_width=m.conv_width, param_seed=m.param_seed)


@dataclass
class LayerParams:
    conv_weight: np.ndarray  # float32 [channels, W]
    a_log: np.ndarray        # float32 [HV]
    dt_bias: np.ndarray      # float32 [HV]


def splitmix64_stream(state: int, n: int) -> np.ndarray:
    """The first n outputs of SplitMix64(state).Next(), as uint64 (vectorised: output i mixes
    state + (i+1) * 0x9E3779B97F4A7C15 mod 2^64)."""
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64(state & _M64) + i * np.uint64(_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def splitmix64_uniform(state: int, n: int) -> np.ndarray:
    """Uniform doubles in [0, 1) from the top 53 bits, as SplitMix64::Uniform()."""
    return (splitmix64_stream(state, n) >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def make_layer_params(config: ModelConfig, layer: int) -> LayerParams:
    """MakeLayerParams of layer_params.cc: state = seed ^ ((layer + 1) * golden), then conv weights
    channel-major as (2u-1)/sqrt(W), then per value head A_log = log(1+15u), dt_bias = log(expm1(dt))
    with dt = 0.001 * 100^u."""
    state = (config.param_seed ^ (((layer + 1) * _GAMMA) & _M64)) & _M64
    ch, w, hv = config.channels, config.conv_width, config.num_v_heads
    u = splitmix64_uniform(state, ch * w + 2 * hv)
    scale = 1.0 / np.sqrt(float(w))
    conv = ((2.0 * u[: ch * w] - 1.0) * scale).astype(np.float32).reshape(ch, w)
    ua = u[ch * w::2]
    ud = u[ch * w + 1::2]
    a_log = np.log(1.0 + 15.0 * ua).astype(np.float32)
    dt = 0.001 * np.power(100.0, ud)
    dt_bias = np.log(np.expm1(dt)).astype(np.float32)
    return LayerParams(conv_weight=conv, a_log=a_log, dt_bias=dt_bias)


def make_all_layer_params(config: ModelConfig) -> list[LayerParams]:
    return [make_layer_params(config, layer) for layer in range(config.num_layers)]


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


@dataclass
class _LayerState:
    state: np.ndarray   # [HV, K, V] fp64
    window: np.ndarray  # [W-1, channels] raw qkv rows, oldest first (fp64 of the received floats)
    position: int = 0


@dataclass
class OracleSequence:
    """One sequence on every layer, advanced token by token in fp64. Copy it (copy()) to evaluate
    drafts and append only the accepted ones to the original."""
    config: ModelConfig
    params: list[LayerParams]
    layers: list[_LayerState] = field(default_factory=list)

    def __post_init__(self):
        c = self.config
        if not self.layers:
            self.layers = [
                _LayerState(np.zeros((c.num_v_heads, c.head_k_dim, c.head_v_dim)),
                            np.zeros((max(c.conv_width - 1, 0), c.channels)))
                for _ in range(c.num_layers)
            ]

    def copy(self) -> "OracleSequence":
        return OracleSequence(self.config, self.params, copy.deepcopy(self.layers))

    def position(self, layer: int) -> int:
        return self.layers[layer].position

    def state(self, layer: int) -> np.ndarray:
        return self.layers[layer].state

    def append(self, layer: int, qkv, a, b) -> np.ndarray:
        """Appends T tokens (qkv [T, channels], a and b [T, HV], the float values the server
        received) on `layer`; returns outputs [T, HV, V] in fp64."""
        c, p, st = self.config, self.params[layer], self.layers[layer]
        H, HV, K, V, W = c.num_k_heads, c.num_v_heads, c.head_k_dim, c.head_v_dim, c.conv_width
        qkv = np.asarray(qkv, dtype=np.float64).reshape(-1, c.channels)
        T = qkv.shape[0]
        a = np.asarray(a, dtype=np.float64).reshape(T, HV)
        b = np.asarray(b, dtype=np.float64).reshape(T, HV)
        full = np.concatenate([st.window, qkv], axis=0)  # [W-1+T, ch]
        w = p.conv_weight.astype(np.float64)
        x = np.zeros((T, c.channels))
        for i in range(W):
            x += full[i:i + T] * w[:, i]
        x = x / (1.0 + np.exp(-x))  # SiLU
        q = x[:, : H * K].reshape(T, H, K)
        k = x[:, H * K: 2 * H * K].reshape(T, H, K)
        v = x[:, 2 * H * K:].reshape(T, HV, V)
        q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6) / np.sqrt(float(K))
        k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
        heads = np.arange(HV) // c.group_size
        qv, kv = q[:, heads], k[:, heads]  # [T, HV, K]
        g = -np.exp(p.a_log.astype(np.float64)) * _softplus(a + p.dt_bias.astype(np.float64))
        beta = 1.0 / (1.0 + np.exp(-b))
        S = st.state
        out = np.empty((T, HV, V))
        for t in range(T):
            S = S * np.exp(g[t])[:, None, None]
            y = np.einsum("hkv,hk->hv", S, kv[t])
            u = beta[t][:, None] * (v[t] - y)
            S = S + kv[t][:, :, None] * u[:, None, :]
            out[t] = np.einsum("hkv,hk->hv", S, qv[t])
        st.state = S
        if W > 1:
            st.window = full[-(W - 1):].copy()
        st.position += T
        return out


def relative_error(got, want) -> float:
    """||got - want|| / ||want|| (inf if got has NaN)."""
    g = np.asarray(got, dtype=np.float64).ravel()
    w = np.asarray(want, dtype=np.float64).ravel()
    if g.shape != w.shape:
        raise ValueError(f"shapes differ: {g.shape} vs {w.shape}")
    if not np.all(np.isfinite(g)):
        return float("inf")
    den = np.linalg.norm(w)
    num = np.linalg.norm(g - w)
    return float(num / den) if den > 0 else float(num)


def random_activations(rng: np.random.Generator, config: ModelConfig, num_tokens: int,
                       scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random qkv [T, channels], a [T, HV], b [T, HV] in float32 (never zeros)."""
    qkv = (rng.standard_normal((num_tokens, config.channels)) * scale).astype(np.float32)
    a = rng.standard_normal((num_tokens, config.num_v_heads)).astype(np.float32)
    b = rng.standard_normal((num_tokens, config.num_v_heads)).astype(np.float32)
    return qkv, a, b
