// What the server derives from a call's context right before running its engine work: whether
// the call is still wanted (a cancelled or expired call does no work at all). The call's tenant
// comes from tenant_identity.h when the call starts.
#pragma once

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "grpcpp/server_context.h"

namespace kvbuffer::server {

// OK if the call is still wanted; CANCELLED or DEADLINE_EXCEEDED (saying nothing was applied)
// otherwise. `what` names the call in the message.
absl::Status CheckCallStillWanted(const grpc::CallbackServerContext& context,
                                  absl::string_view what);

}  // namespace kvbuffer::server
