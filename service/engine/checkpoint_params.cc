#include "service/engine/checkpoint_params.h"

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kernels/reference/dtype.h"
#include "service/engine/tensor.h"

namespace kvbuffer {
namespace {

// One tensor's entry in a safetensors header.
struct TensorEntry {
  std::string file;
  std::string dtype;
  std::vector<int64_t> shape;
  int64_t begin = 0;
  int64_t end = 0;
  int64_t data_start = 0;  // absolute offset of the file's data section
};

// A minimal JSON reader for safetensors headers: objects, arrays, strings, integers; anything
// else is skipped structurally.
class HeaderParser {
 public:
  explicit HeaderParser(const std::string& text) : s_(text) {}

  // Parses {"name": {"dtype": ..., "shape": [...], "data_offsets": [b, e]}, ...} into `out`.
  absl::Status Parse(const std::string& file, int64_t data_start,
                     std::map<std::string, TensorEntry>* out) {
    Skip();
    if (!Eat('{')) return Error("expected '{'");
    Skip();
    if (Eat('}')) return absl::OkStatus();
    while (true) {
      std::string name;
      if (!ReadString(&name)) return Error("expected a tensor name");
      Skip();
      if (!Eat(':')) return Error("expected ':'");
      Skip();
      if (name == "__metadata__") {
        if (!SkipValue()) return Error("bad __metadata__");
      } else {
        TensorEntry t;
        t.file = file;
        t.data_start = data_start;
        if (absl::Status st = ParseEntry(&t); !st.ok()) return st;
        (*out)[name] = std::move(t);
      }
      Skip();
      if (Eat('}')) return absl::OkStatus();
      if (!Eat(',')) return Error("expected ',' or '}'");
      Skip();
    }
  }

 private:
  absl::Status ParseEntry(TensorEntry* t) {
    if (!Eat('{')) return Error("expected a tensor entry object");
    Skip();
    while (!Eat('}')) {
      std::string key;
      if (!ReadString(&key)) return Error("expected a key");
      Skip();
      if (!Eat(':')) return Error("expected ':'");
      Skip();
      if (key == "dtype") {
        if (!ReadString(&t->dtype)) return Error("dtype must be a string");
      } else if (key == "shape") {
        if (!ReadInts(&t->shape)) return Error("shape must be an array of integers");
      } else if (key == "data_offsets") {
        std::vector<int64_t> off;
        if (!ReadInts(&off) || off.size() != 2) return Error("data_offsets must be [begin, end]");
        t->begin = off[0];
        t->end = off[1];
      } else if (!SkipValue()) {
        return Error("bad value");
      }
      Skip();
      Eat(',');
      Skip();
    }
    return absl::OkStatus();
  }

  absl::Status Error(const char* what) const {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors header: ", what, " at byte ", pos_));
  }
  void Skip() {
    while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
  }
  bool Eat(char c) {
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  bool ReadString(std::string* out) {
    if (!Eat('"')) return false;
    out->clear();
    while (pos_ < s_.size() && s_[pos_] != '"') {
      if (s_[pos_] == '\\' && pos_ + 1 < s_.size()) ++pos_;
      out->push_back(s_[pos_++]);
    }
    return Eat('"');
  }
  bool ReadInts(std::vector<int64_t>* out) {
    out->clear();
    if (!Eat('[')) return false;
    Skip();
    if (Eat(']')) return true;
    while (true) {
      size_t start = pos_;
      if (pos_ < s_.size() && s_[pos_] == '-') ++pos_;
      while (pos_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[pos_]))) ++pos_;
      int64_t v;
      if (!absl::SimpleAtoi(s_.substr(start, pos_ - start), &v)) return false;
      out->push_back(v);
      Skip();
      if (Eat(']')) return true;
      if (!Eat(',')) return false;
      Skip();
    }
  }
  bool SkipValue() {
    Skip();
    if (pos_ >= s_.size()) return false;
    char c = s_[pos_];
    if (c == '"') {
      std::string ignored;
      return ReadString(&ignored);
    }
    if (c == '{' || c == '[') {
      const char close = c == '{' ? '}' : ']';
      ++pos_;
      Skip();
      if (Eat(close)) return true;
      while (true) {
        if (c == '{') {
          std::string key;
          if (!ReadString(&key)) return false;
          Skip();
          if (!Eat(':')) return false;
        }
        if (!SkipValue()) return false;
        Skip();
        if (Eat(close)) return true;
        if (!Eat(',')) return false;
        Skip();
      }
    }
    while (pos_ < s_.size() && s_[pos_] != ',' && s_[pos_] != '}' && s_[pos_] != ']') ++pos_;
    return true;
  }

  const std::string& s_;
  size_t pos_ = 0;
};

absl::Status ReadHeader(const std::string& file, std::map<std::string, TensorEntry>* out) {
  std::ifstream in(file, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", file));
  uint8_t len_bytes[8];
  if (!in.read(reinterpret_cast<char*>(len_bytes), 8)) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": shorter than a safetensors header"));
  }
  uint64_t len = 0;
  for (int i = 7; i >= 0; --i) len = (len << 8) | len_bytes[i];
  if (len == 0 || len > (100u << 20)) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": header length ", len, " is not valid"));
  }
  std::string header(len, '\0');
  if (!in.read(header.data(), static_cast<std::streamsize>(len))) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": truncated header"));
  }
  absl::Status s = HeaderParser(header).Parse(file, static_cast<int64_t>(8 + len), out);
  if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat(file, ": ", s.message()));
  return absl::OkStatus();
}

// Reads tensor `name` as fp32, checking that it has `want` elements.
absl::StatusOr<std::vector<float>> ReadTensor(const std::string& name, const TensorEntry& t,
                                              int64_t want) {
  DType dtype;
  if (t.dtype == "F32") {
    dtype = DType::kFloat32;
  } else if (t.dtype == "F16") {
    dtype = DType::kFloat16;
  } else if (t.dtype == "BF16") {
    dtype = DType::kBFloat16;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(t.file, ": tensor ", name, " has dtype ",
                                                   t.dtype, "; expected F32, F16 or BF16"));
  }
  int64_t elems = 1;
  for (int64_t d : t.shape) elems *= d;
  if (elems != want) {
    return absl::InvalidArgumentError(absl::StrCat(t.file, ": tensor ", name, " has shape ",
                                                   ShapeString(t.shape), " (", elems,
                                                   " elements), expected ", want, " elements"));
  }
  const int64_t bytes = elems * static_cast<int64_t>(DTypeSize(dtype));
  if (t.end - t.begin != bytes || t.begin < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(t.file, ": tensor ", name, " data_offsets do not match its shape"));
  }
  std::ifstream in(t.file, std::ios::binary);
  in.seekg(t.data_start + t.begin);
  std::string raw(static_cast<size_t>(bytes), '\0');
  if (!in.read(raw.data(), bytes)) {
    return absl::InvalidArgumentError(absl::StrCat(t.file, ": tensor ", name, " is truncated"));
  }
  std::vector<float> out(static_cast<size_t>(elems));
  for (int64_t i = 0; i < elems; ++i) out[i] = LoadAsFloat(raw.data(), dtype, i);
  return out;
}

}  // namespace

absl::StatusOr<std::vector<LayerParams>> LoadCheckpointParams(const std::string& path,
                                                             const ModelConfig& config) {
  std::vector<std::string> files;
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    for (const auto& e : std::filesystem::directory_iterator(path, ec)) {
      if (e.path().extension() == ".safetensors") files.push_back(e.path().string());
    }
    std::sort(files.begin(), files.end());
    if (files.empty()) return absl::NotFoundError(absl::StrCat(path, " holds no .safetensors"));
  } else {
    files.push_back(path);
  }
  std::map<std::string, TensorEntry> tensors;
  for (const std::string& f : files) {
    if (absl::Status s = ReadHeader(f, &tensors); !s.ok()) return s;
  }
  // Linear-attention layers: "<prefix>.layers.<i>.linear_attn.A_log", ordered by i.
  std::map<int64_t, std::string> layers;  // i -> "<prefix>.layers.<i>.linear_attn."
  for (const auto& [name, t] : tensors) {
    if (!absl::EndsWith(name, ".linear_attn.A_log")) continue;
    std::string base = name.substr(0, name.size() - std::strlen("A_log"));
    std::vector<std::string> parts = absl::StrSplit(base, '.');
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
      int64_t idx;
      if (parts[i] == "layers" && absl::SimpleAtoi(parts[i + 1], &idx)) {
        layers[idx] = base;
        break;
      }
    }
  }
  if (static_cast<int32_t>(layers.size()) != config.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(path, " holds ", layers.size(),
                                                   " linear-attention layers; the model config has ",
                                                   config.num_layers));
  }
  std::vector<LayerParams> params;
  const int64_t conv = static_cast<int64_t>(config.channels()) * config.conv_width;
  for (const auto& [idx, base] : layers) {
    LayerParams p;
    struct Want {
      const char* suffix;
      int64_t elems;
      std::vector<float>* dst;
    };
    for (const Want& w : {Want{"conv1d.weight", conv, &p.conv_weight},
                          Want{"A_log", config.num_v_heads, &p.a_log},
                          Want{"dt_bias", config.num_v_heads, &p.dt_bias}}) {
      const std::string name = base + w.suffix;
      auto it = tensors.find(name);
      if (it == tensors.end()) {
        return absl::NotFoundError(absl::StrCat(path, ": tensor ", name, " is missing"));
      }
      auto v = ReadTensor(name, it->second, w.elems);
      if (!v.ok()) return v.status();
      *w.dst = std::move(*v);
    }
    params.push_back(std::move(p));
  }
  return params;
}

}  // namespace kvbuffer
