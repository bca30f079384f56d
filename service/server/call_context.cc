#include "service/server/call_context.h"

#include <chrono>

#include "absl/strings/str_cat.h"

namespace kvbuffer::server {

absl::Status CheckCallStillWanted(const grpc::CallbackServerContext& context,
                                  absl::string_view what) {
  if (context.deadline() <= std::chrono::system_clock::now()) {
    return absl::DeadlineExceededError(
        absl::StrCat(what, ": deadline passed before the call ran; nothing was applied"));
  }
  if (context.IsCancelled()) {
    return absl::CancelledError(
        absl::StrCat(what, ": cancelled before the call ran; nothing was applied"));
  }
  return absl::OkStatus();
}

}  // namespace kvbuffer::server
