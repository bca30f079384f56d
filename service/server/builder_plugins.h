// Which process-wide gRPC server plugins a server gets. Linking grpc++_reflection registers the
// reflection plugin for every ServerBuilder of the process; these options take plugins off one
// builder (the plaintext health port gets none, the API port loses reflection when calls must
// authenticate).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "grpcpp/impl/server_builder_option.h"

namespace kvbuffer::server {

// The name gRPC's reflection plugin (grpc::reflection::ProtoServerReflectionPlugin) reports.
inline constexpr char kReflectionPlugin[] = "proto_server_reflection";

// A ServerBuilder option that removes the plugins named `names` (every plugin when empty).
std::unique_ptr<grpc::ServerBuilderOption> WithoutPlugins(std::vector<std::string> names = {});

}  // namespace kvbuffer::server
