#include "service/engine/cpu_backend.h"

#include "service/engine/backend_validation.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <stdexcept>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/reference/buffer_fold.h"
#include "kernels/reference/chunked_prefill.h"
#include "kernels/reference/dtype.h"

namespace kvbuffer {
namespace {

bool ValidDType(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16;
}

// Converts n elements of type t starting at element `first` of src (any alignment) to fp32.
void ToFloat(const void* src, DType t, size_t first, size_t n, float* dst) {
  const uint8_t* p = static_cast<const uint8_t*>(src) + first * DTypeSize(t);
  if (t == DType::kFloat32) {
    std::memcpy(dst, p, n * sizeof(float));
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    dst[i] = t == DType::kFloat16 ? FP16ToFloat(h) : BF16ToFloat(h);
  }
}

// Converts n fp32 values to type t at element `first` of dst (any alignment), rounding to
// nearest even.
void FromFloat(const float* src, size_t n, DType t, void* dst, size_t first) {
  uint8_t* p = static_cast<uint8_t*>(dst) + first * DTypeSize(t);
  if (t == DType::kFloat32) {
    std::memcpy(p, src, n * sizeof(float));
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    const uint16_t h = t == DType::kFloat16 ? FloatToFP16(src[i]) : FloatToBF16(src[i]);
    std::memcpy(p + 2 * i, &h, 2);
  }
}

int64_t PhysicalMemoryBytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page = sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page <= 0) return INT64_MAX;
  return static_cast<int64_t>(pages) * page;
}

}  // namespace

absl::Status CpuBackend::Allocate(const ModelConfig& config, const std::vector<LayerParams>& params,
                                  const PoolSizes& sizes) {
  if (std::string m = ValidateModelConfig(config); !m.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("model: ", m));
  }
  if (static_cast<int64_t>(params.size()) != config.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("params: expected ", config.num_layers, " layers, got ", params.size()));
  }
  for (size_t l = 0; l < params.size(); ++l) {
    const LayerParams& p = params[l];
    if (static_cast<int64_t>(p.conv_weight.size()) !=
            static_cast<int64_t>(config.channels()) * config.conv_width ||
        static_cast<int32_t>(p.a_log.size()) != config.num_v_heads ||
        static_cast<int32_t>(p.dt_bias.size()) != config.num_v_heads) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "params[%d]: expected conv_weight %d x %d, A_log and dt_bias of %d; got %d, %d, %d", l,
          config.channels(), config.conv_width, config.num_v_heads, p.conv_weight.size(),
          p.a_log.size(), p.dt_bias.size()));
    }
  }
  if (sizes.state_slots < 0 || sizes.buffer_pages < 0 || sizes.conv_slots < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("pool sizes must be >= 0: state_slots=", sizes.state_slots,
                     " buffer_pages=", sizes.buffer_pages, " conv_slots=", sizes.conv_slots));
  }
  if (sizes.page_tokens < 1 || sizes.max_drafts < 0) {
    return absl::InvalidArgumentError(absl::StrCat("page_tokens must be >= 1 and max_drafts >= 0",
                                                   ", got ", sizes.page_tokens, " and ",
                                                   sizes.max_drafts));
  }
  if (!ValidDType(sizes.buffer_dtype) || !ValidDType(sizes.conv_dtype)) {
    return absl::InvalidArgumentError("buffer_dtype and conv_dtype must be FP32, FP16 or BF16");
  }
  const PoolElementBytes bytes = ComputePoolElementBytes(config, sizes);
  const long double total = static_cast<long double>(sizes.state_slots) * bytes.state_slot +
                            static_cast<long double>(sizes.buffer_pages) * bytes.buffer_page +
                            static_cast<long double>(sizes.conv_slots) * bytes.conv_slot;
  if (total > static_cast<long double>(PhysicalMemoryBytes())) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("pools need %.0Lf bytes, more than the host's %d bytes of memory", total,
                        PhysicalMemoryBytes()));
  }
  allocated_ = false;
  try {
    states_.assign(static_cast<size_t>(sizes.state_slots) * config.num_layers *
                       static_cast<size_t>(config.state_elems()),
                   0.0f);
    pages_.assign(static_cast<size_t>(sizes.buffer_pages) * bytes.buffer_page, 0);
    conv_.assign(static_cast<size_t>(sizes.conv_slots) * bytes.conv_slot, 0);
  } catch (const std::bad_alloc&) {
    states_ = {};
    pages_ = {};
    conv_ = {};
    return absl::ResourceExhaustedError(
        absl::StrFormat("cannot allocate %.0Lf bytes of host pools", total));
  } catch (const std::length_error&) {
    states_ = {};
    pages_ = {};
    conv_ = {};
    return absl::ResourceExhaustedError(
        absl::StrFormat("host pools of %.0Lf bytes are too large", total));
  }
  config_ = config;
  params_ = params;
  sizes_ = sizes;
  bytes_ = bytes;
  conv_rows_ = config.conv_width - 1 + sizes.max_drafts;
  allocated_ = true;
  return absl::OkStatus();
}

absl::Status CpuBackend::CheckAllocated() const {
  if (!allocated_) return absl::FailedPreconditionError("CpuBackend: Allocate was not called");
  return absl::OkStatus();
}

float* CpuBackend::StateLayer(int32_t slot, int32_t layer) {
  return states_.data() + (static_cast<size_t>(slot) * config_.num_layers + layer) *
                              static_cast<size_t>(config_.state_elems());
}

uint8_t* CpuBackend::ConvLayer(int32_t slot, int32_t layer) {
  return conv_.data() + (static_cast<size_t>(slot) * config_.num_layers + layer) * conv_rows_ *
                            config_.channels() * DTypeSize(sizes_.conv_dtype);
}

uint8_t* CpuBackend::RowAddress(const PageSpan& span, int32_t layer, int32_t row) {
  const int32_t page = span.pages[row / sizes_.page_tokens];
  return pages_.data() + static_cast<size_t>(page) * bytes_.buffer_page +
         (static_cast<size_t>(layer) * sizes_.page_tokens + row % sizes_.page_tokens) *
             bytes_.buffer_row;
}

BufferRows CpuBackend::GatherRows(const PageSpan& span, int32_t layer, int32_t n) {
  const size_t hk = static_cast<size_t>(config_.num_k_heads) * config_.head_k_dim;
  const size_t hv = static_cast<size_t>(config_.out_elems());
  const size_t nh = static_cast<size_t>(config_.num_v_heads);
  const size_t dsize = DTypeSize(sizes_.buffer_dtype);
  rows_k_.resize(n * hk);
  rows_u_.resize(n * hv);
  rows_G_.resize(n * nh);
  for (int32_t r = 0; r < n; ++r) {
    const uint8_t* row = RowAddress(span, layer, r);
    ToFloat(row, sizes_.buffer_dtype, 0, hk, rows_k_.data() + r * hk);
    ToFloat(row + hk * dsize, sizes_.buffer_dtype, 0, hv, rows_u_.data() + r * hv);
    std::memcpy(rows_G_.data() + r * nh, row + (hk + hv) * dsize, nh * sizeof(float));
  }
  return BufferRows{rows_k_.data(), rows_u_.data(), rows_G_.data(), n};
}

void CpuBackend::StoreRow(const PageSpan& span, int32_t layer, int32_t row, const float* k,
                          const float* u, const float* G) {
  const size_t hk = static_cast<size_t>(config_.num_k_heads) * config_.head_k_dim;
  const size_t hv = static_cast<size_t>(config_.out_elems());
  const size_t dsize = DTypeSize(sizes_.buffer_dtype);
  uint8_t* dst = RowAddress(span, layer, row);
  FromFloat(k, hk, sizes_.buffer_dtype, dst, 0);
  FromFloat(u, hv, sizes_.buffer_dtype, dst + hk * dsize, 0);
  std::memcpy(dst + (hk + hv) * dsize, G, config_.num_v_heads * sizeof(float));
}

void CpuBackend::LoadWindow(int32_t conv_slot, int32_t layer) {
  const size_t n = static_cast<size_t>(config_.conv_width - 1) * config_.channels();
  window_.resize(n);
  ToFloat(ConvLayer(conv_slot, layer), sizes_.conv_dtype, 0, n, window_.data());
}

void CpuBackend::StoreConvRows(int32_t conv_slot, int32_t layer, int32_t first_row,
                               const float* rows, int32_t n) {
  const size_t ch = static_cast<size_t>(config_.channels());
  FromFloat(rows, n * ch, sizes_.conv_dtype, ConvLayer(conv_slot, layer), first_row * ch);
}

absl::Status CpuBackend::RunLayerStep(const LayerStep& step) {
  if (absl::Status s = CheckAllocated(); !s.ok()) return s;
  // Validate everything before touching any storage.
  if (absl::Status s = ValidateLayerStep(config_, sizes_, step); !s.ok()) return s;

  const int32_t ch = config_.channels();
  const int32_t HV = config_.num_v_heads;
  const size_t hk = static_cast<size_t>(config_.num_k_heads) * config_.head_k_dim;
  const size_t hv = static_cast<size_t>(config_.out_elems());
  const int32_t W1 = config_.conv_width - 1;
  for (const StepItem& it : step.items) {
    const int32_t T = it.num_tokens;
    const size_t t0 = static_cast<size_t>(it.token_offset);
    const PageSpan span{step.page_table.subspan(it.page_offset, it.num_pages)};
    float* S = it.state_slot >= 0 ? StateLayer(it.state_slot, step.layer) : nullptr;

    qkv_.resize(static_cast<size_t>(T) * ch);
    a_.resize(static_cast<size_t>(T) * HV);
    b_.resize(static_cast<size_t>(T) * HV);
    ToFloat(step.qkv, step.in_dtype, t0 * ch, qkv_.size(), qkv_.data());
    ToFloat(step.a, step.in_dtype, t0 * HV, a_.size(), a_.data());
    ToFloat(step.b, step.in_dtype, t0 * HV, b_.size(), b_.data());

    // (1) Optional fold of the committed buffer.
    bool state_zero = it.state_is_new;
    int32_t present = it.buffer_rows;
    if (it.fold_first) {
      FoldBuffer(config_, S, state_zero, GatherRows(span, step.layer, present));
      state_zero = false;
      present = 0;
    } else if (S != nullptr && state_zero && !it.chunked) {
      std::fill(S, S + config_.state_elems(), 0.0f);
      state_zero = false;
    }

    // (2) Token preparation against the committed conv window.
    LoadWindow(it.conv_slot, step.layer);
    PrepareTokens(config_, params_[step.layer], window_.data(), qkv_.data(), a_.data(), b_.data(),
                  T, &tok_);

    // (3) Chunked prefill or buffered step, then the new rows.
    out_.resize(T * hv);
    new_u_.resize(T * hv);
    if (it.chunked) {
      const int32_t tail = T - it.fold_tokens;
      new_G_.resize(static_cast<size_t>(tail) * HV);
      ChunkedPrefill(config_, S, state_zero, tok_, it.fold_tokens, out_.data(), new_u_.data(),
                     new_G_.data());
      for (int32_t r = 0; r < tail; ++r) {
        const size_t t = static_cast<size_t>(it.fold_tokens) + r;
        StoreRow(span, step.layer, r, tok_.k.data() + t * hk, new_u_.data() + t * hv,
                 new_G_.data() + static_cast<size_t>(r) * HV);
      }
    } else {
      const BufferRows rows = GatherRows(span, step.layer, present);
      new_G_.resize(static_cast<size_t>(T) * HV);
      BufferedStep(config_, S, rows, tok_, out_.data(), new_u_.data(), new_G_.data());
      for (int32_t r = 0; r < T; ++r) {
        StoreRow(span, step.layer, present + r, tok_.k.data() + r * hk, new_u_.data() + r * hv,
                 new_G_.data() + static_cast<size_t>(r) * HV);
      }
    }
    FromFloat(out_.data(), out_.size(), step.out_dtype, step.out, t0 * hv);

    // (4) Conv: committed tokens advance the window; drafts keep their raw rows beside it.
    if (step.kind == StepKind::kVerify) {
      StoreConvRows(it.conv_slot, step.layer, W1, qkv_.data(), T);
    } else {
      AdvanceConvWindow(config_, window_.data(), qkv_.data(), T);
      StoreConvRows(it.conv_slot, step.layer, 0, window_.data(), W1);
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::FoldBuffers(int32_t layer, std::span<const FoldItem> items,
                                     std::span<const int32_t> page_table) {
  if (absl::Status s = CheckAllocated(); !s.ok()) return s;
  if (absl::Status s = ValidateFoldItems(config_, sizes_, layer, items, page_table); !s.ok()) {
    return s;
  }
  for (const FoldItem& it : items) {
    const PageSpan span{page_table.subspan(it.page_offset, it.num_pages)};
    FoldBuffer(config_, StateLayer(it.state_slot, layer), it.state_is_new,
               GatherRows(span, layer, it.buffer_rows));
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::CommitConv(int32_t layer, std::span<const ConvCommitItem> items) {
  if (absl::Status s = CheckAllocated(); !s.ok()) return s;
  if (absl::Status s = ValidateConvCommits(config_, sizes_, layer, items); !s.ok()) return s;
  // Rows 0..W-2+a of the slot are window ++ the first a drafts: the new window is the last W-1.
  const size_t row_bytes = static_cast<size_t>(config_.channels()) * DTypeSize(sizes_.conv_dtype);
  const size_t W1 = static_cast<size_t>(config_.conv_width - 1);
  for (const ConvCommitItem& it : items) {
    if (it.accepted == 0 || W1 == 0) continue;
    uint8_t* base = ConvLayer(it.conv_slot, layer);
    std::memmove(base, base + it.accepted * row_bytes, W1 * row_bytes);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::ResetConv(std::span<const int32_t> conv_slots) {
  if (absl::Status s = CheckAllocated(); !s.ok()) return s;
  if (absl::Status s = ValidateConvSlots(sizes_, conv_slots); !s.ok()) return s;
  for (int32_t slot : conv_slots) {
    std::memset(conv_.data() + static_cast<size_t>(slot) * bytes_.conv_slot, 0, bytes_.conv_slot);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::ReadState(int32_t state_slot, int32_t layer, float* out) {
  if (absl::Status s = CheckAllocated(); !s.ok()) return s;
  if (absl::Status s = ValidateStateRead(config_, sizes_, state_slot, layer, out); !s.ok()) {
    return s;
  }
  const float* S = StateLayer(state_slot, layer);
  std::copy(S, S + config_.state_elems(), out);
  return absl::OkStatus();
}

BackendMemory CpuBackend::Memory() const {
  BackendMemory m;
  if (!allocated_) return m;
  m.pool_bytes = static_cast<int64_t>(sizes_.state_slots) * bytes_.state_slot +
                 static_cast<int64_t>(sizes_.buffer_pages) * bytes_.buffer_page +
                 static_cast<int64_t>(sizes_.conv_slots) * bytes_.conv_slot;
  return m;
}

std::unique_ptr<Backend> MakeCpuBackend() { return std::make_unique<CpuBackend>(); }

}  // namespace kvbuffer
