// libFuzzer target over request decoding and validation: the input is parsed as a
// kvbuffer.v1.StreamRequest (the envelope of every call) and run through the server's real path,
// RequestHandler -> request validation -> tensor codec -> engine (CPU backend, tiny model), against
// a fresh fixture of open sequences in every state, checking the invariants of
// Fixture::RunAndCheck (no crash, no sanitizer report, a precise error that changes nothing, or a
// well-formed answer, and no pool element lost).
#include <cstddef>
#include <cstdint>

#include "kvbuffer/v1/attention_service.pb.h"
#include "tests/fuzz/fuzz_fixture.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvbuffer::v1::StreamRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return -1;  // not worth keeping
  kvbuffer::fuzz::Fixture fixture;
  fixture.RunAndCheck(request);
  return 0;
}
