#include "service/server/server_flags.h"

#include <cstdint>
#include <memory>
#include <utility>

#include "absl/flags/flag.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "service/server/model_config_file.h"

namespace {
const kvbuffer::EngineOptions kEngineDefaults;
}  // namespace

ABSL_FLAG(std::string, backend, "auto",
          "auto | cpu | cuda. auto = cuda when this build has it and a GPU is visible, else cpu");
ABSL_FLAG(int32_t, device, 0, "GPU index for --backend=cuda");
ABSL_FLAG(std::string, cuda_prefill, "exact",
          "CUDA prefill: exact (fp32, ~1e-6 from the fp64 oracle) | tensor_core (bf16 UT form, "
          "~1e-2, fast for long prompts)");
ABSL_FLAG(int32_t, tensor_parallel, 1,
          "Tensor parallelism: the model's heads sharded over this many ranks (must divide the "
          "key heads); 1: none");
ABSL_FLAG(std::string, tp_mode, "threads",
          "threads (this process drives the GPUs over NCCL) | processes (this process is rank 0; "
          "ranks > 0 run `kvbuffer-tp-worker --leader=HOST:PORT --device=D`) | simulated (CPU "
          "shards in this process, no NCCL)");
ABSL_FLAG(std::string, tp_devices, "",
          "GPUs of ranks 0..N-1, e.g. 0,1 (default 0..N-1); --tp_mode=processes uses the first "
          "for rank 0 (default --device)");
ABSL_FLAG(std::string, tp_bootstrap, "0.0.0.0:7070",
          "--tp_mode=processes: HOST:PORT where rank 0 serves the bootstrap the workers join");
ABSL_FLAG(double, tp_init_timeout_seconds, 120,
          "Longest wait for every tensor-parallel rank to join at startup");
ABSL_FLAG(double, tp_op_timeout_seconds, 60,
          "A tensor-parallel command slower than this on any rank breaks the group (health "
          "NOT_SERVING)");
ABSL_FLAG(bool, tp_direct_host_steps, true,
          "--tp_mode=threads: each GPU copies its heads of a step's activations from the request "
          "on its own thread and transfers them itself; false: steps go through the NCCL rank "
          "protocol (one broadcast, one gather), as with --tp_mode=processes");
ABSL_FLAG(std::string, host, "0.0.0.0", "Address to listen on");
ABSL_FLAG(int32_t, port, 50051, "Port to listen on; 0 picks a free one (printed on stdout)");
ABSL_FLAG(std::string, model, "qwen3-next-80b-a3b",
          "Model preset: qwen3-next-80b-a3b | small | tiny (ignored when --config is given)");
ABSL_FLAG(std::string, config, "",
          "Model config file: key=value lines or JSON (see docs/api.md); overrides --model");
ABSL_FLAG(int32_t, flush_interval, kEngineDefaults.flush_interval,
          "C: buffered rows a stateful sequence folds into its state");
ABSL_FLAG(int32_t, stateless_limit, kEngineDefaults.stateless_limit,
          "Tokens a sequence may hold with no state at all");
ABSL_FLAG(int32_t, max_drafts, kEngineDefaults.max_drafts,
          "Most drafts per sequence in one VerifyDrafts (<= flush_interval)");
ABSL_FLAG(int32_t, max_sequences, kEngineDefaults.max_sequences, "Open sequences (conv slots)");
ABSL_FLAG(int32_t, max_sequences_per_tenant, kEngineDefaults.max_sequences_per_tenant,
          "Open sequences one tenant may hold (0: no quota); with authentication off every caller "
          "is the one tenant \"\"");
ABSL_FLAG(int32_t, state_slots, kEngineDefaults.state_slots,
          "Sequences that may hold a state at once");
ABSL_FLAG(int32_t, buffer_pages, kEngineDefaults.buffer_pages,
          "Buffer pages of page_tokens rows (all layers)");
ABSL_FLAG(int32_t, page_tokens, kEngineDefaults.page_tokens, "Rows per buffer page");
ABSL_FLAG(std::string, buffer_dtype, "fp32", "Element type of buffered k^ and u: fp32 | bf16");
ABSL_FLAG(std::string, conv_dtype, "fp32", "Element type of conv window rows: fp32 | bf16");
ABSL_FLAG(double, idle_ttl_seconds, absl::ToDoubleSeconds(kEngineDefaults.idle_ttl),
          "Idle sequences are closed after this many seconds");
ABSL_FLAG(int32_t, replay_max_tokens, kEngineDefaults.replay_max_tokens,
          "Outputs of calls up to this many tokens per sequence are kept for exact replay");
ABSL_FLAG(int64_t, max_message_bytes, int64_t{256} << 20,
          "Largest request or response in bytes; larger ones get RESOURCE_EXHAUSTED");
ABSL_FLAG(int32_t, executor_threads, 4, "Threads running engine work");
ABSL_FLAG(int32_t, stream_window, 64, "Requests a Stream reads ahead of its answers");
ABSL_FLAG(int32_t, metrics_port, -1,
          "Prometheus GET /metrics on this port (0 picks a free one, printed on stdout); -1: off");
ABSL_FLAG(std::string, metrics_host, "", "Address of the metrics endpoint; empty: --host");
ABSL_FLAG(double, reclaim_interval_seconds, 5, "How often idle sequences are looked for");
ABSL_FLAG(double, drain_grace_seconds, 0,
          "On SIGTERM/SIGINT: seconds readiness reports NOT_SERVING (and OpenSequences is "
          "refused) before the listener closes");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain of the API port; with --tls_key the port speaks TLS only");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle client certificates are verified against (mutual TLS)");
ABSL_FLAG(bool, require_client_cert, false,
          "Refuse TLS connections without a client certificate verified by --tls_client_ca");
ABSL_FLAG(std::string, auth_tokens_file, "",
          "Bearer tokens: lines \"<token> <tenant>\"; calls must send metadata "
          "\"authorization: Bearer <token>\" and act in their tenant's namespace of sequence ids");
ABSL_FLAG(bool, tenant_from_client_cert, false,
          "A verified client certificate (mutual TLS) names the caller's tenant: its first subject "
          "alternative name, else its common name; a bearer token, when sent, takes precedence");
ABSL_FLAG(int32_t, health_port, -1,
          "Plaintext port serving only grpc.health.v1 (for probes when the API port needs TLS or "
          "tokens); 0 picks a free one (printed on stdout); -1: off");
ABSL_FLAG(std::string, health_host, "", "Address of the health-only port; empty: --host");
ABSL_FLAG(bool, reflection, true,
          "Serve grpc.reflection on the API port; it is off regardless while calls must "
          "authenticate per call (bearer tokens, or client-certificate tenants without "
          "--require_client_cert): the reflection service cannot check credentials");
ABSL_FLAG(double, shutdown_timeout_seconds, 30,
          "On SIGTERM/SIGINT: seconds in-flight calls get to finish before they are cancelled");

namespace kvbuffer::server {

namespace {

absl::StatusOr<DType> StorageDType(const std::string& flag, const std::string& value) {
  const std::string v = absl::AsciiStrToLower(value);
  if (v == "fp32" || v == "float32") return DType::kFloat32;
  if (v == "bf16" || v == "bfloat16") return DType::kBFloat16;
  return absl::InvalidArgumentError(
      absl::StrCat("--", flag, " is \"", value, "\", expected fp32 or bf16"));
}

absl::Status Positive(const char* flag, double v) {
  if (v > 0) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("--", flag, " must be > 0, got ", v));
}

// Reads the tensor-parallel flags into `tp`; `model` is what the heads are split from.
absl::Status TensorParallelFromFlags(const ModelConfig& model, TensorParallelChoice& tp) {
  tp.size = absl::GetFlag(FLAGS_tensor_parallel);
  if (tp.size < 1 || tp.size > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tensor_parallel must be in [1, 64], got ", tp.size));
  }
  tp.mode = absl::AsciiStrToLower(absl::GetFlag(FLAGS_tp_mode));
  if (tp.mode != "threads" && tp.mode != "processes" && tp.mode != "simulated") {
    return absl::InvalidArgumentError(
        absl::StrCat("--tp_mode is \"", tp.mode, "\", expected threads, processes or simulated"));
  }
  if (tp.size > 1 && model.num_k_heads % tp.size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("--tensor_parallel=", tp.size,
                                                   " does not divide the model's ",
                                                   model.num_k_heads, " key heads"));
  }
  tp.devices.clear();
  for (absl::string_view d :
       absl::StrSplit(absl::GetFlag(FLAGS_tp_devices), ',', absl::SkipWhitespace())) {
    int device = -1;
    if (!absl::SimpleAtoi(d, &device) || device < 0) {
      return absl::InvalidArgumentError(absl::StrCat("--tp_devices is \"",
                                                     absl::GetFlag(FLAGS_tp_devices),
                                                     "\", expected GPU indices like 0,1"));
    }
    tp.devices.push_back(device);
  }
  tp.bootstrap = absl::GetFlag(FLAGS_tp_bootstrap);
  if (tp.mode == "processes" && tp.bootstrap.find(':') == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tp_bootstrap is \"", tp.bootstrap, "\", expected HOST:PORT"));
  }
  const double init = absl::GetFlag(FLAGS_tp_init_timeout_seconds);
  const double op = absl::GetFlag(FLAGS_tp_op_timeout_seconds);
  if (absl::Status s = Positive("tp_init_timeout_seconds", init); !s.ok()) return s;
  if (absl::Status s = Positive("tp_op_timeout_seconds", op); !s.ok()) return s;
  tp.init_timeout = absl::Seconds(init);
  tp.op_timeout = absl::Seconds(op);
  tp.direct_host_steps = absl::GetFlag(FLAGS_tp_direct_host_steps);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ServerConfig> ServerConfigFromFlags() {
  ServerConfig c;
  EngineOptions& e = c.engine;
  if (const std::string path = absl::GetFlag(FLAGS_config); !path.empty()) {
    absl::StatusOr<ModelConfig> model = LoadModelConfigFile(path);
    if (!model.ok()) return model.status();
    e.model = *model;
  } else if (!ModelPreset(absl::GetFlag(FLAGS_model), &e.model)) {
    return absl::InvalidArgumentError(absl::StrCat("--model is \"", absl::GetFlag(FLAGS_model),
                                                   "\", expected one of ",
                                                   absl::StrJoin(ModelPresetNames(), ", ")));
  }
  e.flush_interval = absl::GetFlag(FLAGS_flush_interval);
  e.stateless_limit = absl::GetFlag(FLAGS_stateless_limit);
  e.max_drafts = absl::GetFlag(FLAGS_max_drafts);
  e.max_sequences = absl::GetFlag(FLAGS_max_sequences);
  e.max_sequences_per_tenant = absl::GetFlag(FLAGS_max_sequences_per_tenant);
  e.state_slots = absl::GetFlag(FLAGS_state_slots);
  e.buffer_pages = absl::GetFlag(FLAGS_buffer_pages);
  e.page_tokens = absl::GetFlag(FLAGS_page_tokens);
  e.replay_max_tokens = absl::GetFlag(FLAGS_replay_max_tokens);
  absl::StatusOr<DType> buffer = StorageDType("buffer_dtype", absl::GetFlag(FLAGS_buffer_dtype));
  if (!buffer.ok()) return buffer.status();
  e.buffer_dtype = *buffer;
  absl::StatusOr<DType> conv = StorageDType("conv_dtype", absl::GetFlag(FLAGS_conv_dtype));
  if (!conv.ok()) return conv.status();
  e.conv_dtype = *conv;
  const double ttl = absl::GetFlag(FLAGS_idle_ttl_seconds);
  if (absl::Status s = Positive("idle_ttl_seconds", ttl); !s.ok()) return s;
  e.idle_ttl = absl::Seconds(ttl);
  if (absl::Status s = ValidateEngineOptions(e); !s.ok()) return s;

  ServerOptions& s = c.server;
  s.host = absl::GetFlag(FLAGS_host);
  s.port = absl::GetFlag(FLAGS_port);
  if (s.port < 0 || s.port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("--port must be in [0, 65535], got ", s.port));
  }
  s.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  if (s.max_message_bytes < 1024 || s.max_message_bytes > int64_t{2147483647}) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max_message_bytes must be in [1024, 2147483647], got ", s.max_message_bytes));
  }
  s.executor_threads = absl::GetFlag(FLAGS_executor_threads);
  if (s.executor_threads < 1 || s.executor_threads > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("--executor_threads must be in [1, 1024], got ", s.executor_threads));
  }
  s.stream_window = absl::GetFlag(FLAGS_stream_window);
  if (s.stream_window < 1 || s.stream_window > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("--stream_window must be in [1, 4096], got ", s.stream_window));
  }
  s.metrics_port = absl::GetFlag(FLAGS_metrics_port);
  if (s.metrics_port < -1 || s.metrics_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics_port must be -1 (off) or in [0, 65535], got ", s.metrics_port));
  }
  s.metrics_host = absl::GetFlag(FLAGS_metrics_host);
  const double reclaim = absl::GetFlag(FLAGS_reclaim_interval_seconds);
  if (absl::Status st = Positive("reclaim_interval_seconds", reclaim); !st.ok()) return st;
  s.reclaim_interval = absl::Seconds(reclaim);

  s.tls.cert_file = absl::GetFlag(FLAGS_tls_cert);
  s.tls.key_file = absl::GetFlag(FLAGS_tls_key);
  s.tls.client_ca_file = absl::GetFlag(FLAGS_tls_client_ca);
  s.tls.require_client_cert = absl::GetFlag(FLAGS_require_client_cert);
  if (absl::Status st = ValidateTlsServerFiles(s.tls); !st.ok()) return st;
  if (const std::string path = absl::GetFlag(FLAGS_auth_tokens_file); !path.empty()) {
    absl::StatusOr<TokenTable> tokens = TokenTable::Load(path);
    if (!tokens.ok()) {
      return absl::Status(tokens.status().code(),
                          absl::StrCat("--auth_tokens_file: ", tokens.status().message()));
    }
    if (tokens->size() == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--auth_tokens_file: ", path, " lists no token"));
    }
    s.auth.tokens = std::make_shared<const TokenTable>(*std::move(tokens));
  }
  s.auth.tenant_from_client_cert = absl::GetFlag(FLAGS_tenant_from_client_cert);
  if (s.auth.tenant_from_client_cert && s.tls.client_ca_file.empty()) {
    return absl::InvalidArgumentError(
        "--tenant_from_client_cert needs mutual TLS: --tls_cert, --tls_key and --tls_client_ca");
  }
  s.health_port = absl::GetFlag(FLAGS_health_port);
  if (s.health_port < -1 || s.health_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--health_port must be -1 (off) or in [0, 65535], got ", s.health_port));
  }
  s.health_host = absl::GetFlag(FLAGS_health_host);
  s.reflection = absl::GetFlag(FLAGS_reflection);

  c.backend.name = absl::GetFlag(FLAGS_backend);
  c.backend.device = absl::GetFlag(FLAGS_device);
  c.backend.cuda_prefill = absl::GetFlag(FLAGS_cuda_prefill);
  if (absl::Status st = TensorParallelFromFlags(e.model, c.backend.tp); !st.ok()) return st;
  const double grace = absl::GetFlag(FLAGS_drain_grace_seconds);
  const double timeout = absl::GetFlag(FLAGS_shutdown_timeout_seconds);
  if (grace < 0 || timeout < 0) {
    return absl::InvalidArgumentError(
        "--drain_grace_seconds and --shutdown_timeout_seconds must be >= 0");
  }
  c.drain_grace = absl::Seconds(grace);
  c.shutdown_timeout = absl::Seconds(timeout);
  return c;
}

}  // namespace kvbuffer::server
