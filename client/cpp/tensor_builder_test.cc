#include "client/cpp/tensor_builder.h"

#include <cstring>
#include <vector>

#include "gtest/gtest.h"

namespace kvbuffer::client {
namespace {

TEST(TensorBuilderTest, Fp32IsStoredExactly) {
  const std::vector<float> v = {1.5f, -2.25f, 3.0e-8f, 7.0f};
  const int64_t shape[] = {2, 2};
  v1::Tensor t = MakeTensor(v, shape, DType::kFloat32);
  EXPECT_EQ(t.dtype(), v1::FP32);
  ASSERT_EQ(t.data().size(), 16u);
  std::vector<float> back;
  ASSERT_TRUE(TensorToFloats(t, &back).ok());
  EXPECT_EQ(back, v);
}

TEST(TensorBuilderTest, HalfTypesRoundToNearestAndReadBackAsRounded) {
  std::vector<float> v = {1.0f, 1.00390625f, -3.14159f, 65504.0f, 1e-3f};
  const int64_t shape[] = {5};
  for (DType d : {DType::kBFloat16, DType::kFloat16}) {
    v1::Tensor t = MakeTensor(v, shape, d);
    ASSERT_EQ(t.data().size(), 10u);
    std::vector<float> back;
    ASSERT_TRUE(TensorToFloats(t, &back).ok());
    std::vector<float> rounded = v;
    RoundToDType(absl::MakeSpan(rounded), d);
    EXPECT_EQ(back, rounded);
    EXPECT_EQ(back[0], 1.0f);
    EXPECT_NE(back[2], v[2]);  // pi is not representable in 16 bits
  }
  // bf16 keeps 8 significant bits: 1 + 2^-8 rounds to even (1.0); fp16 keeps it.
  std::vector<float> x = {1.00390625f};
  RoundToDType(absl::MakeSpan(x), DType::kBFloat16);
  EXPECT_EQ(x[0], 1.0f);
  x = {1.00390625f};
  RoundToDType(absl::MakeSpan(x), DType::kFloat16);
  EXPECT_EQ(x[0], 1.00390625f);
}

TEST(TensorBuilderTest, MalformedTensorsAreRejected) {
  v1::Tensor t;
  t.set_dtype(v1::BF16);
  t.add_shape(3);
  t.set_data(std::string(5, '\0'));
  std::vector<float> out;
  EXPECT_EQ(TensorToFloats(t, &out).code(), absl::StatusCode::kInvalidArgument);
  t.set_dtype(v1::DTYPE_UNSPECIFIED);
  t.set_data(std::string(6, '\0'));
  EXPECT_EQ(TensorToFloats(t, &out).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvbuffer::client
