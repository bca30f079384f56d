// A tiny HTTP/1.x server for Prometheus scrapes: GET /metrics answers the registry's text
// exposition, anything else 404. POSIX sockets, one thread, one connection at a time, each
// bounded by a receive/send timeout, so a slow or hostile client cannot stall it for long.
#pragma once

#include <atomic>
#include <string>
#include <thread>

#include "service/server/metrics/metrics.h"

namespace kvbuffer::metrics {

class MetricsHttpServer {
 public:
  explicit MetricsHttpServer(Registry* registry) : registry_(registry) {}
  ~MetricsHttpServer() { Stop(); }
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // Binds `host` ("0.0.0.0", "127.0.0.1", "::", ...) and `port` (0 = an ephemeral port) and
  // starts serving. On failure returns false and sets *error.
  bool Start(const std::string& host, int port, std::string* error);

  // The bound port (after Start).
  int port() const { return port_; }

  // Stops the thread and closes the socket. Idempotent.
  void Stop();

  // Requests served so far (any status).
  uint64_t requests_served() const { return served_.load(std::memory_order_relaxed); }

 private:
  void Loop();
  void Serve(int fd);

  Registry* registry_;
  int listen_fd_ = -1;
  int wake_fds_[2] = {-1, -1};
  int port_ = 0;
  std::thread thread_;
  std::atomic<uint64_t> served_{0};
};

}  // namespace kvbuffer::metrics
