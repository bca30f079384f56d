// The human-readable summary of a mock worker session.
#pragma once

#include <string>

#include "client/mock_worker/mock_session.h"

namespace kvbuffer::mock {

// Formats the verdict, work, latency per RPC, accuracy, memory and capacity of `report`.
std::string FormatReport(const MockSessionReport& report);

}  // namespace kvbuffer::mock
