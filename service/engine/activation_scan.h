// A fast scan of activation bytes for out-of-range values: a test of exponent bits on whole 64-bit
// words (no conversions, no branches per element), which compilers vectorise.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/reference/dtype.h"

namespace kvbuffer {

// Returns the index of the first of the `n` elements of `dtype` at `data` whose bits without the
// sign are >= `limit_bits` (e.g. 0x7f80 for bf16 or 0x7f800000 for fp32: the first NaN or Inf),
// or `n` when there is none. `data` needs no particular alignment; limit_bits must be at most the
// sign bit (0x8000 for 16-bit types, 0x80000000 for fp32).
size_t FindFirstMagnitudeAtLeast(const void* data, size_t n, DType dtype, uint32_t limit_bits);

// FindFirstMagnitudeAtLeast that also copies the elements to `dst` (which must not overlap
// `src`), reading `src` once: on a hit, the elements from the hit's block on may not be copied.
size_t CopyAndFindFirstMagnitudeAtLeast(const void* src, void* dst, size_t n, DType dtype,
                                        uint32_t limit_bits);

// Copies `rows` rows of `n` elements of `dtype` from `src` to `dst` (row strides in bytes; the
// rows must not overlap), testing each element as FindFirstMagnitudeAtLeast does, on the calling
// thread with one store fence at the end (for many short rows, e.g. one shard's heads of each
// token). True if no element reached the limit; false stops early (the copy is then incomplete).
bool CopyRowsBelowMagnitude(const void* src, size_t src_stride, void* dst, size_t dst_stride,
                            size_t rows, size_t n, DType dtype, uint32_t limit_bits);

// Both scans split tensors of at least kParallelScanBytes over helper threads (shared by the
// process, started on first use), one memory stream per thread. Sets how many helpers they may
// use (default: a quarter of the hardware threads, at most 3; 0: scan on the caller only).
void SetActivationScanHelpers(int helpers);

// The number of helpers the scans may use.
int ActivationScanHelpers();

inline constexpr size_t kParallelScanBytes = size_t{1} << 20;

}  // namespace kvbuffer
