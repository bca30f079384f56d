"""Tensors on the wire (KServe v2 / Triton style: dtype, shape, raw little-endian bytes).

numpy arrays (float32, float16, float64 sent as FP32; uint16 holding bfloat16 bit patterns when the
dtype is given as "bf16") and, when torch is importable, torch tensors (float32, float16, bfloat16).
bfloat16 needs no ml_dtypes: values are converted by bit manipulation on uint16, rounding to nearest
even exactly like kernels/reference/dtype.h.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from kvbuffer._proto import pb

FP32, FP16, BF16 = "fp32", "fp16", "bf16"
_NAME_TO_ENUM = {FP32: pb.FP32, FP16: pb.FP16, BF16: pb.BF16}
_ENUM_TO_NAME = {v: k for k, v in _NAME_TO_ENUM.items()}
_ALIASES = {
    "fp32": FP32, "float32": FP32, "float": FP32, "f32": FP32,
    "fp16": FP16, "float16": FP16, "half": FP16, "f16": FP16,
    "bf16": BF16, "bfloat16": BF16,
}


def normalize_dtype(dtype: Any) -> str | None:
    """Maps "fp32"/"float32"/np.float32/torch.bfloat16/pb.BF16/... to "fp32", "fp16" or "bf16"."""
    if dtype is None:
        return None
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype in _ENUM_TO_NAME:
            return _ENUM_TO_NAME[dtype]
        raise ValueError(f"unknown wire dtype enum {dtype}")
    text = str(dtype).lower()
    for prefix in ("torch.", "<class 'numpy.", "numpy.", "dtype("):
        if text.startswith(prefix):
            text = text[len(prefix):]
    text = text.strip("'\")>")
    if text in _ALIASES:
        return _ALIASES[text]
    raise ValueError(f"unsupported dtype {dtype!r}: use fp32, fp16 or bf16")


def dtype_enum(dtype: Any) -> int:
    """Wire enum value of a dtype name (pb.DTYPE_UNSPECIFIED for None)."""
    name = normalize_dtype(dtype)
    return pb.DTYPE_UNSPECIFIED if name is None else _NAME_TO_ENUM[name]


def dtype_size(dtype: Any) -> int:
    return 4 if normalize_dtype(dtype) == FP32 else 2


def float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    bits = f.view(np.uint32)
    nan = (bits & 0x7F800000) == 0x7F800000
    nan &= (bits & 0x007FFFFF) != 0
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


def bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 values (exact)."""
    b = np.ascontiguousarray(bits, dtype=np.uint16)
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_to(x: np.ndarray, dtype: Any) -> np.ndarray:
    """The float32 values `x` takes after a trip through `dtype` (what the server receives)."""
    name = normalize_dtype(dtype)
    x = np.asarray(x, dtype=np.float32)
    if name == FP32:
        return x
    if name == FP16:
        return x.astype(np.float16).astype(np.float32)
    return bf16_bits_to_float(float_to_bf16_bits(x))


def _torch():
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return None
    return torch


def is_torch(x: Any) -> bool:
    t = type(x)
    return t.__module__.startswith("torch") and t.__name__ in ("Tensor", "Parameter")


def to_numpy(x: Any, dtype: Any = None) -> tuple[np.ndarray, str]:
    """(array ready for the wire, wire dtype name). bf16 comes back as uint16 bit patterns."""
    want = normalize_dtype(dtype)
    if is_torch(x):
        torch = _torch()
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            bits = t.view(torch.int16).numpy().view(np.uint16)
            if want in (None, BF16):
                return bits, BF16
            return round_to(bf16_bits_to_float(bits), want).astype(
                np.float16 if want == FP16 else np.float32), want
        if t.dtype == torch.float16:
            x = t.numpy()
        else:
            x = t.to(torch.float32).numpy()
    a = np.asarray(x)
    if a.dtype == np.uint16:
        if want != BF16:
            raise ValueError("uint16 arrays are taken as bfloat16 bit patterns: pass dtype='bf16'")
        return np.ascontiguousarray(a), BF16
    if a.dtype.kind not in "fiu":
        raise ValueError(f"activations must be floating point, got {a.dtype}")
    if want is None:
        want = FP16 if a.dtype == np.float16 else FP32
    if want == FP32:
        return np.ascontiguousarray(a, dtype="<f4"), FP32
    if want == FP16:
        return np.ascontiguousarray(a, dtype="<f2"), FP16
    return float_to_bf16_bits(a.astype(np.float32)), BF16


def make_tensor(x: Any, dtype: Any = None, shape: tuple[int, ...] | None = None):
    """pb.Tensor from a numpy array or torch tensor (shape defaults to the array's)."""
    arr, name = to_numpy(x, dtype)
    return tensor_from_array(arr, name, shape)


def tensor_from_array(arr: np.ndarray, name: str, shape: tuple[int, ...] | None = None):
    """pb.Tensor from an array already in wire form (to_numpy's output)."""
    t = pb.Tensor()
    t.dtype = _NAME_TO_ENUM[name]
    t.shape.extend(int(s) for s in (arr.shape if shape is None else shape))
    t.data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    return t


def wire_values(x: Any, dtype: Any = None) -> np.ndarray:
    """float32 values the server will see for `x` sent as `dtype` (for oracles)."""
    arr, name = to_numpy(x, dtype)
    if name == BF16:
        return bf16_bits_to_float(arr)
    return arr.astype(np.float32)


def tensor_to_numpy(t, as_bf16_bits: bool = False) -> np.ndarray:
    """numpy array of a pb.Tensor: FP32 -> float32, FP16 -> float16, BF16 -> float32 (exact) or,
    with as_bf16_bits, the raw uint16 bit patterns."""
    name = _ENUM_TO_NAME.get(t.dtype)
    shape = tuple(int(s) for s in t.shape)
    if name == FP32:
        arr = np.frombuffer(t.data, dtype="<f4")
    elif name == FP16:
        arr = np.frombuffer(t.data, dtype="<f2")
    elif name == BF16:
        arr = np.frombuffer(t.data, dtype="<u2")
        if not as_bf16_bits:
            arr = bf16_bits_to_float(arr)
    else:
        raise ValueError(f"tensor with unspecified dtype {t.dtype}")
    n = int(np.prod(shape)) if shape else arr.size
    if arr.size != n:
        raise ValueError(f"tensor of shape {shape} carries {arr.size} elements")
    return arr.reshape(shape).astype(arr.dtype.newbyteorder("="), copy=False)


def tensor_to_torch(t):
    """torch tensor of a pb.Tensor, in its own dtype (bfloat16 included)."""
    torch = _torch()
    if torch is None:
        raise ImportError("torch is not installed")
    if t.dtype == pb.BF16:
        bits = tensor_to_numpy(t, as_bf16_bits=True)
        return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(tensor_to_numpy(t).copy())
