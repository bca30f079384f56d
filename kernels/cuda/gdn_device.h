// Plain-old-data descriptions shared by the CUDA kernels and their host launchers: model geometry,
// pool layouts and per-call item descriptors. No CUDA types, so host code can build them.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define KVB_HOST_DEVICE __host__ __device__
#else
#define KVB_HOST_DEVICE
#endif

namespace kvbuffer::cuda {

// Element type codes; values match kvbuffer::DType.
enum DTypeCode : int32_t { kF32 = 1, kF16 = 2, kBF16 = 3 };

// Bytes of one element of `code`.
KVB_HOST_DEVICE inline constexpr int32_t DTypeBytes(int32_t code) { return code == kF32 ? 4 : 2; }

// Shapes of the linear-attention layers plus the pool geometry that addressing needs.
struct Geometry {
  int32_t H = 0;            // key heads
  int32_t HV = 0;           // value heads
  int32_t K = 0;            // key head dim
  int32_t V = 0;            // value head dim
  int32_t W = 0;            // conv width
  int32_t L = 0;            // layers
  int32_t channels = 0;     // 2*H*K + HV*V
  int32_t page_tokens = 0;  // buffer rows per page
  int32_t max_drafts = 0;   // draft rows per conv slot and layer
};

// Device pools. States: [slot][L][HV][K][V] fp32. Pages: [page][L] blocks of page_tokens rows,
// each block laid out as k^ [page_tokens][H][K], u [page_tokens][HV][V] (buffer dtype), then
// G [page_tokens][HV] fp32. Conv slots: [slot][L][W-1+max_drafts][channels] (conv dtype): rows
// 0..W-2 are the window (oldest first), the rest hold draft raw rows of the last verify.
struct Pools {
  float* states = nullptr;
  uint8_t* pages = nullptr;
  void* conv = nullptr;
  int32_t buffer_dtype = kF32;
  int32_t conv_dtype = kF32;
  int64_t page_bytes = 0;   // all layers of one page
  int64_t block_bytes = 0;  // one layer of one page
  int64_t u_offset = 0;     // byte offset of u inside a block
  int64_t g_offset = 0;     // byte offset of G inside a block
};

// Computes the byte layout of `pools` pages from the geometry and the buffer dtype.
inline void ComputePageLayout(const Geometry& g, Pools* pools) {
  const int64_t es = DTypeBytes(pools->buffer_dtype);
  const int64_t pt = g.page_tokens;
  pools->u_offset = pt * g.H * g.K * es;
  pools->g_offset = pools->u_offset + pt * g.HV * g.V * es;
  pools->block_bytes = pools->g_offset + pt * g.HV * 4;
  pools->page_bytes = pools->block_bytes * g.L;
}

// Layer parameters on the device for one layer: conv weight [channels][W], A_log and dt_bias [HV].
struct LayerWeights {
  const float* conv_w = nullptr;
  const float* a_log = nullptr;
  const float* dt_bias = nullptr;
};

// Prepared tokens of one call, indexed by the call's token index. fp32 for the buffered path,
// bf16 (q, k, v) for the chunked path; G is cumulative relative to the checkpoint (buffered
// path) or to the start of the 64-token chunk (chunked path).
struct Prepared {
  float* q = nullptr;     // [T][H][K]
  float* k = nullptr;     // [T][H][K]
  float* v = nullptr;     // [T][HV][V]
  float* G = nullptr;     // [T][HV]
  float* beta = nullptr;  // [T][HV]
  uint16_t* qh = nullptr;
  uint16_t* kh = nullptr;
  uint16_t* vh = nullptr;
};

// Flags of a StepDesc.
enum StepFlags : int32_t {
  kStateNew = 1,    // the state slot is fresh: read it as zero
  kFoldFirst = 2,   // fold the buffer_rows rows into the state before the tokens
  kVerify = 4,      // tentative tokens: conv window not advanced, draft raw rows stored
  kChunked = 8,     // chunked (UT) prefill item
  kFoldAfter = 16,  // fold the item's own tokens into the state at the end; write no rows
};

// One sequence's part of a call, as the kernels see it.
struct StepDesc {
  int32_t token_offset = 0;
  int32_t num_tokens = 0;  // 0: fold only
  int32_t state_slot = -1;
  int32_t flags = 0;
  int32_t buffer_rows = 0;
  int32_t page_offset = 0;
  int32_t conv_slot = 0;
  int32_t fold_tokens = 0;  // chunked items: tokens folded into the state
};

// Flags of a PrepUnit.
enum PrepFlags : int32_t {
  kChunkMode = 1,     // write bf16 q/k/v and chunk-local G; window updated by a later launch
  kInlineWindow = 2,  // advance the conv window inside the prep kernel (whole item in the unit)
  kStoreDrafts = 4,   // store raw rows into the draft area (verify)
};

// A run of at most 64 tokens of one item that one prep block column handles.
struct PrepUnit {
  int32_t item = 0;
  int32_t t_begin = 0;  // relative to the item's first token
  int32_t t_end = 0;
  int32_t flags = 0;
};

// Chunk size of the UT form.
inline constexpr int32_t kChunk = 64;

// One chunk of the UT form: tokens [t_begin, t_begin + len) of item `item`.
struct ChunkUnit {
  int32_t item = 0;
  int32_t t_begin = 0;
  int32_t len = 0;
  int32_t tail = 0;  // 1: the chunk lies past fold_tokens (rows stay in the buffer)
};

// Chunks of one chunked item: units [unit_begin, unit_end); those before unit_fold_end fold.
struct ChunkItem {
  int32_t item = 0;
  int32_t unit_begin = 0;
  int32_t unit_fold_end = 0;
  int32_t unit_end = 0;
};

// Device scratch for the chunk-local products of the UT form, indexed by chunk unit.
struct ChunkScratch {
  uint16_t* W = nullptr;  // [units][HV][64][K] bf16: A (beta e^G K^)
  uint16_t* U = nullptr;  // [units][HV][64][V] bf16: A (beta V)
  uint16_t* P = nullptr;  // [units][HV][64][64] bf16: (Q^ K^T o Gamma), diagonal included
};

}  // namespace kvbuffer::cuda
