#include "service/server/builder_plugins.h"

#include <algorithm>
#include <utility>

#include "grpcpp/impl/server_builder_plugin.h"

namespace kvbuffer::server {

namespace {

class WithoutPluginsOption : public grpc::ServerBuilderOption {
 public:
  explicit WithoutPluginsOption(std::vector<std::string> names) : names_(std::move(names)) {}

  void UpdateArguments(grpc::ChannelArguments* /*args*/) override {}

  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    std::erase_if(*plugins, [this](const std::unique_ptr<grpc::ServerBuilderPlugin>& p) {
      return names_.empty() || std::find(names_.begin(), names_.end(), p->name()) != names_.end();
    });
  }

 private:
  std::vector<std::string> names_;
};

}  // namespace

std::unique_ptr<grpc::ServerBuilderOption> WithoutPlugins(std::vector<std::string> names) {
  return std::make_unique<WithoutPluginsOption>(std::move(names));
}

}  // namespace kvbuffer::server
