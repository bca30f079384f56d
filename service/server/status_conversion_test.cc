#include "service/server/status_conversion.h"

#include "gtest/gtest.h"

namespace kvbuffer::server {
namespace {

TEST(StatusConversionTest, EveryCodeKeepsItsValueAndMessage) {
  for (int c = 1; c <= 16; ++c) {
    const absl::Status s(static_cast<absl::StatusCode>(c), "what went wrong");
    const grpc::Status g = ToGrpcStatus(s);
    EXPECT_EQ(static_cast<int>(g.error_code()), c);
    EXPECT_EQ(g.error_message(), "what went wrong");
    v1::StreamResponse r;
    SetStreamStatus(s, &r);
    EXPECT_EQ(r.status_code(), c);
    EXPECT_EQ(r.status_message(), "what went wrong");
  }
}

TEST(StatusConversionTest, OkIsOkAndClearsAStaleMessage) {
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  v1::StreamResponse r;
  r.set_status_message("stale");
  r.set_status_code(5);
  SetStreamStatus(absl::OkStatus(), &r);
  EXPECT_EQ(r.status_code(), 0);
  EXPECT_EQ(r.status_message(), "");
}

TEST(StatusConversionTest, TheCodesOfDesignSection5) {
  EXPECT_EQ(ToGrpcStatus(absl::NotFoundError("")).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(ToGrpcStatus(absl::InvalidArgumentError("")).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(ToGrpcStatus(absl::ResourceExhaustedError("")).error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(ToGrpcStatus(absl::OutOfRangeError("")).error_code(), grpc::StatusCode::OUT_OF_RANGE);
  EXPECT_EQ(ToGrpcStatus(absl::FailedPreconditionError("")).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(ToGrpcStatus(absl::UnavailableError("")).error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(ToGrpcStatus(absl::InternalError("")).error_code(), grpc::StatusCode::INTERNAL);
}

}  // namespace
}  // namespace kvbuffer::server
