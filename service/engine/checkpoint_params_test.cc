// Loading layer parameters from safetensors files written by the test.
#include "service/engine/checkpoint_params.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/reference/dtype.h"

namespace kvbuffer {
namespace {

struct Blob {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

// Writes a safetensors file holding `blobs`.
void WriteSafetensors(const std::string& path, const std::vector<Blob>& blobs) {
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
  std::string data;
  for (const Blob& b : blobs) {
    std::string shape;
    for (size_t i = 0; i < b.shape.size(); ++i) shape += (i ? "," : "") + std::to_string(b.shape[i]);
    absl::StrAppend(&header, ",\"", b.name, "\":{\"dtype\":\"", b.dtype, "\",\"shape\":[", shape,
                    "],\"data_offsets\":[", data.size(), ",", data.size() + b.bytes.size(), "]}");
    data += b.bytes;
  }
  header += "}";
  std::ofstream out(path, std::ios::binary);
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
  out << header << data;
}

Blob Make(const std::string& name, DType t, std::vector<int64_t> shape, std::vector<float>* vals,
          std::mt19937& rng) {
  Blob b;
  b.name = name;
  b.dtype = t == DType::kFloat32 ? "F32" : t == DType::kBFloat16 ? "BF16" : "F16";
  b.shape = shape;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  b.bytes.resize(n * DTypeSize(t));
  vals->resize(n);
  std::normal_distribution<float> g;
  for (int64_t i = 0; i < n; ++i) {
    StoreFromFloat(b.bytes.data(), t, i, g(rng));
    (*vals)[i] = LoadAsFloat(b.bytes.data(), t, i);
  }
  return b;
}

TEST(CheckpointParams, LinearLayersAreReadInOrderAcrossFiles) {
  ModelConfig c;
  ASSERT_TRUE(ModelPreset("tiny", &c));
  std::mt19937 rng(std::random_device{}());
  const std::string dir = ::testing::TempDir() + "/ckpt_" + std::to_string(rng());
  std::filesystem::create_directories(dir);
  // Layers 0 and 2 are linear; layer 1 is full attention (its tensors are ignored).
  std::vector<float> conv0, alog0, dt0, conv2, alog2, dt2, other;
  WriteSafetensors(dir + "/model-00001-of-00002.safetensors",
                   {Make("model.layers.0.linear_attn.conv1d.weight", DType::kBFloat16,
                         {c.channels(), 1, c.conv_width}, &conv0, rng),
                    Make("model.layers.0.linear_attn.A_log", DType::kFloat32, {c.num_v_heads},
                         &alog0, rng),
                    Make("model.layers.0.linear_attn.dt_bias", DType::kFloat16, {c.num_v_heads},
                         &dt0, rng),
                    Make("model.layers.1.self_attn.q_proj.weight", DType::kBFloat16, {4, 4},
                         &other, rng)});
  WriteSafetensors(dir + "/model-00002-of-00002.safetensors",
                   {Make("model.layers.2.linear_attn.dt_bias", DType::kBFloat16, {c.num_v_heads},
                         &dt2, rng),
                    Make("model.layers.2.linear_attn.A_log", DType::kBFloat16, {c.num_v_heads},
                         &alog2, rng),
                    Make("model.layers.2.linear_attn.conv1d.weight", DType::kFloat32,
                         {c.channels(), c.conv_width}, &conv2, rng)});
  auto p = LoadCheckpointParams(dir, c);
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_EQ(p->size(), 2u);
  EXPECT_EQ((*p)[0].conv_weight, conv0);
  EXPECT_EQ((*p)[0].a_log, alog0);
  EXPECT_EQ((*p)[0].dt_bias, dt0);
  EXPECT_EQ((*p)[1].conv_weight, conv2);
  EXPECT_EQ((*p)[1].a_log, alog2);
  EXPECT_EQ((*p)[1].dt_bias, dt2);

  // A wrong shape and a missing tensor are named in the error.
  const std::string bad = dir + "/bad.safetensors";
  std::filesystem::remove(dir + "/model-00002-of-00002.safetensors");
  WriteSafetensors(dir + "/model-00002-of-00002.safetensors",
                   {Make("model.layers.2.linear_attn.A_log", DType::kFloat32, {c.num_v_heads + 1},
                         &alog2, rng),
                    Make("model.layers.2.linear_attn.conv1d.weight", DType::kFloat32,
                         {c.channels(), c.conv_width}, &conv2, rng)});
  auto e = LoadCheckpointParams(dir, c);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("model.layers.2.linear_attn."), std::string::npos)
      << e.status();
  std::filesystem::remove_all(dir);
}

TEST(CheckpointParams, NotASafetensorsFileIsAClearError) {
  const std::string path = ::testing::TempDir() + "/not_safetensors.bin";
  std::ofstream(path) << "hello";
  ModelConfig c;
  auto p = LoadCheckpointParams(path, c);
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << p.status();
  EXPECT_EQ(LoadCheckpointParams("/nonexistent/x.safetensors", c).status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace kvbuffer
