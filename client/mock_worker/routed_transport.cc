#include "client/mock_worker/routed_transport.h"

#include <string>
#include <utility>

#include "absl/time/clock.h"
#include "client/mock_worker/unary_dispatch.h"

namespace kvbuffer::mock {

namespace {

class RoutedTransport final : public CallTransport {
 public:
  explicit RoutedTransport(client::RoutedClient* client) : client_(client) {}

  absl::Status Run(absl::Span<v1::StreamRequest* const> calls,
                   absl::Span<v1::StreamResponse* const> responses) override {
    for (size_t i = 0; i < calls.size(); ++i) {
      const v1::StreamRequest& c = *calls[i];
      v1::StreamResponse* r = responses[i];
      const absl::Time start = absl::Now();
      DispatchUnary(client_, c, r);
      latencies_.Record(CallName(c), absl::Now() - start);
    }
    return absl::OkStatus();
  }

  absl::Status Close() override { return absl::OkStatus(); }

 private:
  client::RoutedClient* client_;
};

}  // namespace

std::unique_ptr<CallTransport> MakeRoutedTransport(client::RoutedClient* client) {
  return std::make_unique<RoutedTransport>(client);
}

}  // namespace kvbuffer::mock
