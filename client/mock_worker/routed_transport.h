// The mock worker's calls routed over replicas by sequence id (client/cpp/routed_client.h): one
// unary RPC per call and replica, the parts of a call sent concurrently.
#pragma once

#include <memory>

#include "client/cpp/routed_client.h"
#include "client/mock_worker/call_transport.h"

namespace kvbuffer::mock {

// A transport running every call through `client` (which must outlive it).
std::unique_ptr<CallTransport> MakeRoutedTransport(client::RoutedClient* client);

}  // namespace kvbuffer::mock
