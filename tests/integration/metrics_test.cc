// The server's Prometheus endpoint counts every unary call and every Stream message by RPC and
// status code, and reports the engine's pools.
#include <memory>
#include <string>

#include "client/cpp/kvbuffer_client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/test_servers.h"
#include "tests/integration/wire_driver.h"

namespace kvbuffer::testing {
namespace {

using ::testing::HasSubstr;

TEST(MetricsEndpointTest, CountsCallsByRpcAndCodeOnBothTransports) {
  server::ServerOptions options;
  options.metrics_port = 0;
  auto server = InProcessServer::Start(SmallModelOptions(), options);
  ASSERT_NE(server, nullptr);
  const int port = server->server()->metrics_port();
  ASSERT_GT(port, 0);

  for (const std::string mode : {"unary", "stream"}) {
    WireDriver d(server->address(), mode, 3);
    ASSERT_TRUE(d.Init().ok());
    auto* a = d.NewSequence(mode == "unary" ? 1 : 2);
    ASSERT_TRUE(d.Open({a}).ok());
    ASSERT_TRUE(d.Prefill({a}, {70}).ok());  // over the stateless limit: holds a state slot
    EXPECT_EQ(d.Flush({d.NewSequence(999)}).code(), absl::StatusCode::kNotFound);
    if (mode == "stream") {
      ASSERT_TRUE(d.CloseTransport().ok());
    }
  }

  absl::StatusOr<std::string> page = HttpGet(port, "/metrics");
  ASSERT_TRUE(page.ok()) << page.status();
  const int32_t L = server->engine()->options().model.num_layers;
  EXPECT_THAT(*page, HasSubstr("200 OK"));
  // GetServerInfo (Init), OpenSequences, L prefills and a failed Flush on each transport.
  EXPECT_THAT(*page, HasSubstr("kvbuffer_requests_total{rpc=\"Prefill\",code=\"OK\"} " +
                               std::to_string(2 * L) + "\n"));
  EXPECT_THAT(*page, HasSubstr("kvbuffer_requests_total{rpc=\"Flush\",code=\"NOT_FOUND\"} 2\n"));
  EXPECT_THAT(*page, HasSubstr("kvbuffer_requests_total{rpc=\"OpenSequences\",code=\"OK\"} 2\n"));
  EXPECT_THAT(*page, HasSubstr("kvbuffer_requests_total{rpc=\"Stream\",code=\"OK\"} 1\n"));
  EXPECT_THAT(*page, HasSubstr("kvbuffer_active_sequences 2\n"));
  EXPECT_THAT(*page, HasSubstr("kvbuffer_state_slots{state=\"used\"} 2\n"));
  EXPECT_THAT(*page, HasSubstr("kvbuffer_build_info{version=\"test\",backend=\"cpu\","
                               "model=\"small\"} 1"));
  absl::StatusOr<std::string> other = HttpGet(port, "/other");
  ASSERT_TRUE(other.ok());
  EXPECT_THAT(*other, HasSubstr("404"));
}

}  // namespace
}  // namespace kvbuffer::testing
