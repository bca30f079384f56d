#include "service/server/model_config_file.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvbuffer::server {
namespace {

using ::testing::HasSubstr;

TEST(ModelConfigFileTest, KeyValueWithPresetAndOverrides) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(
      "# a comment\npreset = small\n  name = mine  # trailing comment\nnum_layers=7\n"
      "param_seed = 42\n",
      "test.cfg");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->name, "mine");
  EXPECT_EQ(c->num_layers, 7);
  EXPECT_EQ(c->num_k_heads, 4);  // from the preset
  EXPECT_EQ(c->head_k_dim, 32);
  EXPECT_EQ(c->param_seed, 42u);
}

TEST(ModelConfigFileTest, KeyValueErrorsNameTheLineOrKey) {
  EXPECT_THAT(std::string(ParseModelConfig("num_layers 3\n", "f").status().message()),
              HasSubstr("f: line 1: expected key = value"));
  EXPECT_THAT(std::string(ParseModelConfig("num_layerz = 3\n", "f").status().message()),
              HasSubstr("unknown key \"num_layerz\""));
  EXPECT_THAT(std::string(ParseModelConfig("num_layers = x\n", "f").status().message()),
              HasSubstr("num_layers = \"x\" is not an integer"));
  EXPECT_THAT(std::string(ParseModelConfig("preset = huge\n", "f").status().message()),
              HasSubstr("unknown preset \"huge\""));
  EXPECT_THAT(
      std::string(ParseModelConfig("preset=tiny\nnum_v_heads = 3\n", "f").status().message()),
      HasSubstr("num_v_heads must be a positive multiple of num_k_heads"));
}

TEST(ModelConfigFileTest, HuggingFaceQwen3NextConfigGivesTheLinearLayers) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(R"({
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "num_hidden_layers": 48,
    "full_attention_interval": 4,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "rope_scaling": null,
    "rope_theta": 10000000,
    "layer_types": ["linear_attention", "full_attention"],
    "nested": {"num_layers": 1, "s": "a \" quote"}
  })",
                                                   "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->name, "qwen3_next");
  EXPECT_EQ(c->num_layers, 36);
  EXPECT_EQ(c->num_k_heads, 16);
  EXPECT_EQ(c->num_v_heads, 32);
  EXPECT_EQ(c->head_k_dim, 128);
  EXPECT_EQ(c->head_v_dim, 128);
  EXPECT_EQ(c->conv_width, 4);
  EXPECT_EQ(c->channels(), 8192);
}

TEST(ModelConfigFileTest, JsonWithOurOwnKeysAndErrors) {
  absl::StatusOr<ModelConfig> c =
      ParseModelConfig(R"({"preset": "tiny", "num_layers": 3, "name": "j"})", "j.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_layers, 3);
  EXPECT_EQ(c->name, "j");
  EXPECT_THAT(std::string(ParseModelConfig(R"({"num_layers" 3})", "j.json").status().message()),
              HasSubstr("j.json: JSON at byte"));
  EXPECT_THAT(std::string(ParseModelConfig(R"({"a": [1, 2)", "j.json").status().message()),
              HasSubstr("unterminated"));
}

TEST(ModelConfigFileTest, MissingFileIsNotFound) {
  absl::StatusOr<ModelConfig> c = LoadModelConfigFile("/no/such/model.cfg");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace kvbuffer::server
