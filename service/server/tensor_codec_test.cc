#include "service/server/tensor_codec.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvbuffer::server {
namespace {

using ::testing::HasSubstr;

v1::Tensor Make(v1::DType dtype, std::initializer_list<int64_t> shape, size_t bytes) {
  v1::Tensor t;
  t.set_dtype(dtype);
  for (int64_t d : shape) t.add_shape(d);
  t.set_data(std::string(bytes, '\x01'));
  return t;
}

TEST(TensorCodecTest, AValidTensorIsBorrowedNotCopied) {
  v1::Tensor t = Make(v1::BF16, {4, 8}, 64);
  TensorView view;
  ASSERT_TRUE(TensorViewFromProto(t, "qkv", &view).ok());
  EXPECT_EQ(view.dtype, DType::kBFloat16);
  EXPECT_EQ(view.shape, (std::vector<int64_t>{4, 8}));
  EXPECT_EQ(view.data, t.data().data());
  EXPECT_EQ(view.size_bytes, 64u);
}

TEST(TensorCodecTest, DataSizeMismatchNamesFieldBytesShapeAndDtype) {
  TensorView view;
  absl::Status s = TensorViewFromProto(Make(v1::BF16, {4, 8}, 100), "qkv", &view);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "qkv.data has 100 bytes, expected 64 for shape [4, 8] BF16");
  s = TensorViewFromProto(Make(v1::FP32, {3}, 8), "a", &view);
  EXPECT_EQ(s.message(), "a.data has 8 bytes, expected 12 for shape [3] FP32");
}

TEST(TensorCodecTest, MissingOrUnknownDtypeIsInvalid) {
  TensorView view;
  absl::Status s = TensorViewFromProto(Make(v1::DTYPE_UNSPECIFIED, {1}, 4), "b", &view);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("b.dtype is DTYPE_UNSPECIFIED"));
  s = TensorViewFromProto(Make(static_cast<v1::DType>(9), {1}, 4), "b", &view);
  EXPECT_THAT(std::string(s.message()), HasSubstr("b.dtype has unknown value 9"));
}

TEST(TensorCodecTest, NegativeAndOverflowingShapesAreInvalid) {
  TensorView view;
  absl::Status s = TensorViewFromProto(Make(v1::FP16, {2, -3}, 0), "qkv", &view);
  EXPECT_EQ(s.message(), "qkv.shape[1] is -3, expected >= 0 (shape [2, -3])");
  s = TensorViewFromProto(Make(v1::FP16, {int64_t{1} << 40, int64_t{1} << 40}, 0), "qkv", &view);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("expected more than 2^63"));
}

TEST(TensorCodecTest, TooManyDimensionsAreRefusedBeforeAnyShapeIsPrinted) {
  v1::Tensor t;
  t.set_dtype(v1::FP32);
  for (int i = 0; i < 100000; ++i) t.add_shape(-1);  // negative too: the rank is checked first
  TensorView view;
  absl::Status s = TensorViewFromProto(t, "qkv", &view);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "qkv.shape has 100000 dimensions, expected at most 8");
  t.clear_shape();
  for (int i = 0; i < kMaxTensorRank; ++i) t.add_shape(1);
  t.set_data(std::string(4, '\0'));
  EXPECT_TRUE(TensorViewFromProto(t, "qkv", &view).ok());
}

TEST(TensorCodecTest, EncodingMovesTheBytes) {
  Tensor t;
  t.dtype = DType::kFloat16;
  t.shape = {2, 3};
  t.bytes = std::string(12, '\x07');
  v1::Tensor out;
  TensorToProto(std::move(t), &out);
  EXPECT_EQ(out.dtype(), v1::FP16);
  EXPECT_THAT(out.shape(), ::testing::ElementsAre(2, 3));
  EXPECT_EQ(out.data(), std::string(12, '\x07'));
}

TEST(TensorCodecTest, DtypesRoundTrip) {
  for (DType d : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    absl::StatusOr<DType> back = DTypeFromProto(DTypeToProto(d), "x");
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(*back, d);
  }
}

}  // namespace
}  // namespace kvbuffer::server
