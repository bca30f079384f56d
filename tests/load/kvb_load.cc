// kvb_load: the full loopback load of docs/reliability.md. Starts kvbuffer-server (CPU backend,
// small model) on an ephemeral port of 127.0.0.1, or uses --server, runs the passes of
// load_runner.h and prints the Markdown summary; exit 0 when the load held, 1 otherwise.
//   build-rel/bin/kvb_load --sessions=64 --rounds=1000 --passes=3
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "tests/integration/test_servers.h"
#include "tests/load/load_runner.h"

ABSL_FLAG(std::string, server, "", "host:port of a running server (default: start one)");
ABSL_FLAG(std::string, model, "small", "Model preset of the server started here");
ABSL_FLAG(int32_t, sessions, 64, "Concurrent Stream sessions");
ABSL_FLAG(int32_t, rounds, 1000, "Model steps per session and pass");
ABSL_FLAG(int32_t, passes, 3, "Passes (the first warms up)");
ABSL_FLAG(int32_t, batch, 2, "Sequences a session keeps open");
ABSL_FLAG(int32_t, executor_threads, 4, "--executor_threads of the server started here");
ABSL_FLAG(uint64_t, seed, 1, "Seed of the sessions");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  kvbuffer::load::LoadOptions o;
  o.sessions = absl::GetFlag(FLAGS_sessions);
  o.rounds = absl::GetFlag(FLAGS_rounds);
  o.passes = absl::GetFlag(FLAGS_passes);
  o.batch = absl::GetFlag(FLAGS_batch);
  o.seed = absl::GetFlag(FLAGS_seed);
  std::unique_ptr<kvbuffer::testing::ChildServer> child;
  if (std::string s = absl::GetFlag(FLAGS_server); !s.empty()) {
    o.server = s;
  } else {
    absl::StatusOr<std::unique_ptr<kvbuffer::testing::ChildServer>> started =
        kvbuffer::load::StartLoadServer(
            &o, {"--model=" + absl::GetFlag(FLAGS_model),
                 absl::StrCat("--executor_threads=", absl::GetFlag(FLAGS_executor_threads)),
                 "--stream_window=64"});
    if (!started.ok()) {
      std::fprintf(stderr, "kvb_load: %s\n", started.status().ToString().c_str());
      return 2;
    }
    child = *std::move(started);
  }
  absl::StatusOr<kvbuffer::load::LoadResult> r = kvbuffer::load::RunLoad(o);
  if (!r.ok()) {
    std::fprintf(stderr, "kvb_load: %s\n", r.status().ToString().c_str());
    return 2;
  }
  std::fputs(kvbuffer::load::FormatLoadResult(*r).c_str(), stdout);
  return r->ok() ? 0 : 1;
}
