// LocalTransport: a TpTransport over host memory for ranks that live in one process (threads),
// with the semantics of the NCCL transport: operations are enqueued and run at Sync(), inside a
// group all sends run before any receive, a receive waits for its peer until the Sync deadline,
// and an abort fails every rank. It lets CI run the whole tensor-parallel protocol on CPU shards.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "service/parallel/tp_transport.h"

namespace kvbuffer::parallel {

// Creates the transports of `world_size` in-process ranks (index = rank), sharing one hub.
std::vector<std::unique_ptr<TpTransport>> MakeLocalTransports(int32_t world_size);

}  // namespace kvbuffer::parallel
