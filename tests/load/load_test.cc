// The CI-sized version of the loopback load (the full one is kvb_load, docs/reliability.md):
// concurrent mock-worker Streams against a kvbuffer-server process, every output checked against
// the fp64 oracle, every pool element back after every pass, memory flat from pass to pass.
#include <unistd.h>

#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/integration/test_servers.h"
#include "tests/load/load_runner.h"

namespace kvbuffer::load {
namespace {

TEST(LoadTest, ConcurrentStreamsMatchTheOracleLoseNothingAndKeepMemoryFlat) {
  LoadOptions o;
  o.sessions = 16;
  o.rounds = 120;
  o.passes = 4;
  o.warmup_passes = 2;        // allocator arenas and gRPC's caches settle over the first two
  o.heap_slack_kb = 2048;     // ~21k calls after the warm-up: a leak of ~100 bytes a call shows
  o.heap_slack_fraction = 0;  // (warm passes here vary by +-0.4 MiB)
  absl::StatusOr<std::unique_ptr<testing::ChildServer>> server =
      StartLoadServer(&o, {"--model=small"});
  ASSERT_TRUE(server.ok()) << server.status();
  absl::StatusOr<LoadResult> r = RunLoad(o);
  ASSERT_TRUE(r.ok()) << r.status();
  const std::string summary = FormatLoadResult(*r);
  EXPECT_TRUE(r->ok()) << summary;
  ASSERT_EQ(r->passes.size(), 4u);
  for (const PassResult& p : r->passes) {
    EXPECT_EQ(p.report.mismatches, 0) << summary;
    EXPECT_EQ(p.report.first_error, "") << summary;
    EXPECT_GT(p.report.checks, 1000) << summary;
    EXPECT_GT(p.report.prefill_tokens, 0);
    EXPECT_GT(p.report.decode_tokens, 0);
    EXPECT_GT(p.report.drafts_verified, 0);
    EXPECT_EQ(p.open_sequences, 0);
    EXPECT_EQ(p.free_state_slots, p.state_slots);
    EXPECT_EQ(p.free_buffer_pages, p.buffer_pages);
    EXPECT_GT(p.rss_kb, 0);
    EXPECT_NE(p.heap_kb, 0);  // read (or -1 under a sanitizer)
  }
  std::printf("%s", summary.c_str());
}

TEST(LoadTest, ReadsResidentMemoryFromProc) {
  EXPECT_GT(ReadRssKb(getpid()), 1024);
  EXPECT_EQ(ReadRssKb(-1), -1);
}

}  // namespace
}  // namespace kvbuffer::load
