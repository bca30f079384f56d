// kvbuffer-mock-worker: plays a Qwen3-Next-shaped model against a kvbuffer-server, checks every
// output against an fp64 oracle, prints a summary and exits non-zero on any mismatch or error.
#include <cstdio>
#include <fstream>
#include <string>
#include <utility>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/ascii.h"
#include "absl/strings/strip.h"
#include "client/mock_worker/mock_session.h"
#include "client/mock_worker/session_report.h"

ABSL_FLAG(std::string, server, "127.0.0.1:50051", "Server address host:port");
ABSL_FLAG(std::string, servers, "",
          "Replicas to route over by sequence id (consistent hashing), instead of --server: "
          "host:port,host:port or dns:///name:port (A/AAAA records); unary mode only");
ABSL_FLAG(std::string, mode, "unary", "unary | stream");
ABSL_FLAG(int32_t, concurrency, 2, "Worker threads, each with its own sequences");
ABSL_FLAG(int32_t, sequences, 0, "Sequences per worker over the session (0: by model size)");
ABSL_FLAG(int32_t, batch, 4, "Sequences a worker keeps open at once");
ABSL_FLAG(int32_t, steps, 0, "Most decode/verify steps per sequence (0: by model size)");
ABSL_FLAG(int32_t, max_prompt, 0, "Longest prompt in tokens (0: by model size)");
ABSL_FLAG(int32_t, layers, 0, "Play the first N layers only (0: all)");
ABSL_FLAG(uint64_t, seed, 1, "Seed of activations, lengths and acceptance");
ABSL_FLAG(double, tolerance, 0,
          "Relative error allowed per call and sequence (0: 1e-5 on a cpu server, 5e-3 on cuda; "
          "looser for bf16 buffers or outputs)");
ABSL_FLAG(double, verify_fraction, 0.4, "Share of steps that verify a draft window");
ABSL_FLAG(int32_t, max_drafts, 4, "Drafts per window at most");
ABSL_FLAG(int32_t, flush_every, 5, "Every N-th step flushes a random half of the sequences");
ABSL_FLAG(std::string, input_dtype, "bf16", "Activations on the wire: bf16 | fp16 | fp32");
ABSL_FLAG(std::string, output_dtype, "fp32", "Outputs requested: fp32 | bf16 | fp16");
ABSL_FLAG(int32_t, stream_window, 8, "Calls in flight on a Stream");
ABSL_FLAG(double, timeout_seconds, 120, "Deadline of each unary call");
ABSL_FLAG(double, wait_for_server_seconds, 10, "How long to wait for the server's readiness");
ABSL_FLAG(int32_t, rounds, 0,
          "Model steps per worker, admitting new sequences as others end, then all are closed "
          "(0: play --sequences to their ends)");
ABSL_FLAG(std::string, token, "", "Bearer token sent as \"authorization: Bearer <token>\"");
ABSL_FLAG(std::string, token_file, "", "File holding the bearer token (first line)");
ABSL_FLAG(bool, tls, false, "Connect with TLS (system roots unless --tls_ca)");
ABSL_FLAG(std::string, tls_ca, "", "PEM CA the server certificate must chain to (implies --tls)");
ABSL_FLAG(std::string, tls_cert, "", "PEM client certificate for mutual TLS (implies --tls)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_server_name, "",
          "Name checked against the server certificate (default: the host of --server)");

namespace {

bool ParseDType(const std::string& s, kvbuffer::DType* out) {
  const std::string v = absl::AsciiStrToLower(s);
  if (v == "fp32")
    *out = kvbuffer::DType::kFloat32;
  else if (v == "bf16")
    *out = kvbuffer::DType::kBFloat16;
  else if (v == "fp16")
    *out = kvbuffer::DType::kFloat16;
  else
    return false;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Mock model worker: a real gRPC client that checks every answer of a kvbuffer-server.\n"
      "Example: kvbuffer-mock-worker --server=127.0.0.1:50051 --mode=stream");
  absl::ParseCommandLine(argc, argv);
  kvbuffer::mock::MockSessionOptions o;
  o.server = absl::GetFlag(FLAGS_server);
  o.servers = absl::GetFlag(FLAGS_servers);
  o.mode = absl::GetFlag(FLAGS_mode);
  o.concurrency = absl::GetFlag(FLAGS_concurrency);
  o.sequences = absl::GetFlag(FLAGS_sequences);
  o.batch = absl::GetFlag(FLAGS_batch);
  o.steps = absl::GetFlag(FLAGS_steps);
  o.max_prompt = absl::GetFlag(FLAGS_max_prompt);
  o.layers = absl::GetFlag(FLAGS_layers);
  o.seed = absl::GetFlag(FLAGS_seed);
  o.tolerance = absl::GetFlag(FLAGS_tolerance);
  o.verify_fraction = absl::GetFlag(FLAGS_verify_fraction);
  o.max_drafts = absl::GetFlag(FLAGS_max_drafts);
  o.flush_every = absl::GetFlag(FLAGS_flush_every);
  o.stream_window = absl::GetFlag(FLAGS_stream_window);
  o.call_timeout = absl::Seconds(absl::GetFlag(FLAGS_timeout_seconds));
  o.wait_for_server = absl::Seconds(absl::GetFlag(FLAGS_wait_for_server_seconds));
  if (!ParseDType(absl::GetFlag(FLAGS_input_dtype), &o.input_dtype) ||
      !ParseDType(absl::GetFlag(FLAGS_output_dtype), &o.output_dtype)) {
    std::fprintf(stderr,
                 "kvbuffer-mock-worker: --input_dtype/--output_dtype must be fp32, bf16 "
                 "or fp16\n");
    return 2;
  }
  o.rounds = absl::GetFlag(FLAGS_rounds);
  o.bearer_token = absl::GetFlag(FLAGS_token);
  if (const std::string path = absl::GetFlag(FLAGS_token_file); !path.empty()) {
    std::ifstream in(path);
    if (!in || !std::getline(in, o.bearer_token)) {
      std::fprintf(stderr, "kvbuffer-mock-worker: --token_file: cannot read %s\n", path.c_str());
      return 2;
    }
    o.bearer_token = std::string(absl::StripAsciiWhitespace(o.bearer_token));
  }
  const std::string ca = absl::GetFlag(FLAGS_tls_ca), cert = absl::GetFlag(FLAGS_tls_cert),
                    key = absl::GetFlag(FLAGS_tls_key);
  if (absl::GetFlag(FLAGS_tls) || !ca.empty() || !cert.empty() || !key.empty()) {
    absl::StatusOr<kvbuffer::client::TlsOptions> tls =
        kvbuffer::client::TlsOptionsFromFiles(ca, cert, key, absl::GetFlag(FLAGS_tls_server_name));
    if (!tls.ok()) {
      std::fprintf(stderr, "kvbuffer-mock-worker: TLS: %s\n", tls.status().ToString().c_str());
      return 2;
    }
    o.tls = *std::move(tls);
  }
  absl::StatusOr<kvbuffer::mock::MockSessionReport> report = kvbuffer::mock::RunMockSession(o);
  if (!report.ok()) {
    std::fprintf(stderr, "kvbuffer-mock-worker: %s\n", report.status().ToString().c_str());
    return 2;
  }
  std::fputs(kvbuffer::mock::FormatReport(*report).c_str(), stdout);
  std::fflush(stdout);
  return report->ok() ? 0 : 1;
}
