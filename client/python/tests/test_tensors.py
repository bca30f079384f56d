"""Wire tensors: dtypes, bf16 by bit manipulation, torch interop (no server needed)."""
import numpy as np
import pytest

from kvbuffer import pb, tensors


def test_bf16_round_to_nearest_even_and_specials():
    x = np.array([1.0, -2.5, 3.14159265, 1e-40, np.inf, -np.inf, 65504.0, 1.00390625,
                  1.01171875], dtype=np.float32)
    bits = tensors.float_to_bf16_bits(x)
    back = tensors.bf16_bits_to_float(bits)
    assert back[0] == 1.0 and back[1] == -2.5
    assert np.isinf(back[4]) and back[4] > 0 and np.isinf(back[5]) and back[5] < 0
    assert back[2] == np.float32(3.140625)
    assert back[7] == 1.0                      # exactly halfway, rounds to even (down)
    assert back[8] == np.float32(1.015625)     # halfway, rounds to even (up)
    nan = tensors.float_to_bf16_bits(np.array([np.nan], dtype=np.float32))
    assert np.isnan(tensors.bf16_bits_to_float(nan))[0]
    # Exhaustive round trip: every bf16 pattern that is not NaN survives unchanged.
    allbits = np.arange(65536, dtype=np.uint16)
    f = tensors.bf16_bits_to_float(allbits)
    ok = ~np.isnan(f)
    assert np.array_equal(tensors.float_to_bf16_bits(f)[ok], allbits[ok])


def test_make_tensor_dtypes_and_shapes():
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    t = tensors.make_tensor(x)
    assert t.dtype == pb.FP32 and list(t.shape) == [3, 4] and len(t.data) == 48
    assert np.array_equal(tensors.tensor_to_numpy(t), x)
    t16 = tensors.make_tensor(x, "fp16")
    assert t16.dtype == pb.FP16 and len(t16.data) == 24
    assert tensors.tensor_to_numpy(t16).dtype == np.float16
    tb = tensors.make_tensor(x, "bf16", shape=(12,))
    assert tb.dtype == pb.BF16 and list(tb.shape) == [12]
    assert np.array_equal(tensors.tensor_to_numpy(tb), tensors.round_to(x, "bf16").ravel())
    assert tensors.tensor_to_numpy(tb, as_bf16_bits=True).dtype == np.uint16
    raw = tensors.float_to_bf16_bits(x)
    assert tensors.make_tensor(raw, "bf16").data == tb.data
    with pytest.raises(ValueError):
        tensors.make_tensor(raw)  # uint16 without dtype="bf16" is ambiguous
    assert tensors.make_tensor(x.astype(np.float64)).dtype == pb.FP32


def test_normalize_dtype_aliases():
    for v in ("fp32", "float32", np.float32, np.dtype("float32"), pb.FP32):
        assert tensors.normalize_dtype(v) == "fp32"
    for v in ("bf16", "bfloat16", pb.BF16):
        assert tensors.normalize_dtype(v) == "bf16"
    assert tensors.normalize_dtype(np.float16) == "fp16"
    assert tensors.dtype_enum(None) == pb.DTYPE_UNSPECIFIED
    with pytest.raises(ValueError):
        tensors.normalize_dtype("int8")


def test_torch_tensors_round_trip():
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 6)
    for dt, name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        t = tensors.make_tensor(x.to(dt))
        assert tensors.normalize_dtype(t.dtype) == name
        back = tensors.tensor_to_torch(t)
        assert back.dtype == dt and torch.equal(back, x.to(dt))
