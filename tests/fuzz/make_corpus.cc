// Writes the request fuzzer's seed corpus (fuzz_fixture.cc SeedRequests) into a directory, one
// serialized kvbuffer.v1.StreamRequest per file named after the seed; checks each seed against the
// fixture's invariants first. Regenerate tests/fuzz/corpus/ with:
//   build-rel/bin/kvb_make_fuzz_corpus tests/fuzz/corpus
#include <cstdio>
#include <fstream>
#include <string>

#include "tests/fuzz/fuzz_fixture.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  int n = 0;
  for (const auto& [name, request] : kvbuffer::fuzz::SeedRequests()) {
    kvbuffer::fuzz::Fixture fixture;
    const kvbuffer::v1::StreamResponse answer = fixture.RunAndCheck(request);
    std::printf("%-30s code %2d %s\n", name.c_str(), answer.status_code(),
                answer.status_message().substr(0, 90).c_str());
    std::ofstream out(std::string(argv[1]) + "/seed_" + name, std::ios::binary);
    if (!request.SerializeToOstream(&out)) {
      std::fprintf(stderr, "cannot write %s\n", name.c_str());
      return 1;
    }
    ++n;
  }
  std::printf("wrote %d seed(s) to %s\n", n, argv[1]);
  return 0;
}
