// What the request fuzzer runs every input against: a fresh engine on the CPU backend (tiny model,
// small pools) behind the server's RequestHandler, with sequences in every interesting state, and
// the invariants a request must never break, whatever its bytes.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kvbuffer/v1/attention_service.pb.h"
#include "service/engine/engine.h"
#include "service/server/request_handler.h"

namespace kvbuffer::fuzz {

// Sequences the fixture opens (tenant, id) and where they stand on every layer:
//   ("a", 1): 5 committed tokens, stateless;  ("a", 2): 40 tokens, with a state;
//   ("a", 3): 6 tokens and 2 drafts pending on every layer;  ("b", 1): 3 tokens.
inline constexpr int64_t kPosA1 = 5, kPosA2 = 40, kPosA3 = 6, kPosB1 = 3;
inline constexpr int32_t kDraftsA3 = 2;

// The tenant a request acts for: "a", "b" or "" by request_id % 3.
std::string TenantFor(uint64_t request_id);

// The engine settings of the fixture (tiny model: L=2, H=2, HV=4, K=V=16, W=4).
EngineOptions FixtureOptions();

class Fixture {
 public:
  // A new engine with the sequences above, and a handler on it; aborts if that fails.
  Fixture();

  server::RequestHandler& handler() { return *handler_; }
  Engine& engine() { return *engine_; }

  // Runs `request` as the Stream would (tenant by request_id) and checks every invariant: the
  // answer echoes the request id and carries a google.rpc.Code; a failed call carries a short
  // message, no result, and changed no sequence, pool or counter; a layer call's output has the
  // shape and size its sequences ask for. Then closes every sequence and checks that every pool
  // element came back. Aborts (with the reason on stderr) when one does not hold. Returns the
  // answer.
  v1::StreamResponse RunAndCheck(const v1::StreamRequest& request);

 private:
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<server::RequestHandler> handler_;
};

// Valid and invalid requests for the fixture's sequences, the fuzzer's seed corpus.
std::vector<std::pair<std::string, v1::StreamRequest>> SeedRequests();

}  // namespace kvbuffer::fuzz
