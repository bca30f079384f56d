#include "client/mock_worker/mock_session.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/cpp/client_status.h"
#include "client/cpp/kvbuffer_client.h"
#include "client/cpp/routed_client.h"
#include "client/cpp/tensor_builder.h"
#include "client/mock_worker/activation_source.h"
#include "client/mock_worker/call_transport.h"
#include "client/mock_worker/checked_sequence.h"
#include "client/mock_worker/layer_calls.h"
#include "client/mock_worker/routed_transport.h"
#include "kernels/reference/layer_params.h"

namespace kvbuffer::mock {

namespace {

// What every worker shares: the model as played (the first `layers` layers) and the limits.
struct PlayedModel {
  ModelConfig config;
  std::vector<LayerParams> params;
  int32_t stateless_limit = 0;
  int32_t flush_interval = 0;
  int32_t max_drafts = 1;
  int32_t server_layers = 0;  // layers the server has (CommitDrafts needs all verified)
  int32_t max_prompt = 0;
  int32_t sequences = 0;
  int32_t steps = 0;
  double tolerance = 0;
};

// Workload defaults by model size: a representative session of the small model takes seconds on
// the CPU backend; at Qwen3-Next shapes the fp64 oracle alone costs ~0.1 s per token, so fewer
// and shorter sequences.
void ChooseWorkload(const MockSessionOptions& o, PlayedModel* m) {
  const double per_token = static_cast<double>(m->config.state_elems()) * m->config.num_layers;
  const bool large = per_token > 4.0e6;
  m->sequences = o.sequences > 0 ? o.sequences : (large ? 3 : 16);
  m->steps = o.steps > 0 ? o.steps : (large ? 8 : 32);
  m->max_prompt = o.max_prompt > 0 ? o.max_prompt
                                   : (large ? m->stateless_limit + m->flush_interval + 4
                                            : std::max(160, m->stateless_limit + 40));
}

double DefaultTolerance(const v1::GetServerInfoResponse& info, DType output_dtype) {
  // CPU servers, sharded ones ("cpu-tp2") too, compute exactly in fp32.
  double tol = absl::StartsWith(info.backend(), "cpu") ? 1e-5 : 5e-3;
  if (info.buffer().buffer_dtype() == v1::BF16 || info.buffer().conv_dtype() == v1::BF16) {
    tol = std::max(tol, 3e-2);
  }
  if (output_dtype == DType::kBFloat16) tol = std::max(tol, 1e-2);
  if (output_dtype == DType::kFloat16) tol = std::max(tol, 2e-3);
  return tol;
}

// Statistics of one worker, merged into the report.
struct WorkerStats {
  int64_t sequences = 0, short_prompts = 0, prefill_tokens = 0, decode_tokens = 0;
  int64_t drafts_verified = 0, drafts_accepted = 0, flushes = 0, replayed = 0, checks = 0;
  double max_err = 0;
  int64_t mismatches = 0;
  std::string first_mismatch;
  std::string first_error;
  LatencyRecorder latencies;
};

class Worker {
 public:
  Worker(int index, const MockSessionOptions& o, const PlayedModel& m, uint64_t first_id)
      : index_(index),
        o_(o),
        m_(m),
        next_id_(first_id),
        rng_(m.config, o.input_dtype, o.seed * 0x9E3779B97F4A7C15ull + index + 1),
        calls_builder_(m.config, o.input_dtype, o.output_dtype,
                       o.seed * 0xBF58476D1CE4E5B9ull + index + 1) {}

  void Run() {
    client::ClientOptions copts;
    copts.timeout = o_.call_timeout;
    copts.tls = o_.tls;
    copts.bearer_token = o_.bearer_token;
    if (!o_.servers.empty()) {  // routed over replicas by sequence id (unary calls)
      absl::StatusOr<std::unique_ptr<client::RoutedClient>> routed =
          client::RoutedClient::Connect(o_.servers, copts);
      if (!routed.ok()) {
        Error(absl::StrCat("routing over ", o_.servers, ": ", routed.status().ToString()));
        return;
      }
      routed_ = *std::move(routed);
      transport_ = MakeRoutedTransport(routed_.get());
    } else {
      client_ = client::Client::Connect(o_.server, copts);
      transport_ = o_.mode == "stream"
                       ? MakeStreamTransport(client_.get(), o_.stream_window, absl::Hours(24))
                       : MakeUnaryTransport(client_.get());
    }
    Loop();
    if (absl::Status s = transport_->Close(); !s.ok()) {
      Error(absl::StrCat("closing the ", o_.mode, " transport: ", s.ToString()));
    }
    if (!active_.empty()) {  // stopped early: do not leave sequences to the idle reclaimer
      std::vector<uint64_t> ids;
      for (auto& seq : active_) ids.push_back(seq->id());
      (routed_ ? routed_->CloseSequences(ids) : client_->CloseSequences(ids)).IgnoreError();
    }
    stats_.latencies = transport_->latencies();
  }

  WorkerStats& stats() { return stats_; }

 private:
  void Loop() {
    // With a number of rounds, sequences keep coming until the last round.
    int32_t remaining = o_.rounds > 0 ? std::numeric_limits<int32_t>::max() : m_.sequences;
    int64_t round = 0;
    while ((remaining > 0 || !active_.empty()) && stats_.first_error.empty()) {
      ++round;
      if (o_.rounds > 0 && round > o_.rounds) {
        CloseAll();
        return;
      }
      // Admit new sequences up to the batch size: open and prefill them.
      std::vector<CheckedSequence*> fresh;
      while (static_cast<int32_t>(active_.size()) < o_.batch && remaining > 0) {
        auto seq = std::make_unique<CheckedSequence>(next_id_++, m_.config, &m_.params);
        seq->lifetime_steps = static_cast<int32_t>(rng_.UniformInt(1, m_.steps));
        fresh.push_back(seq.get());
        active_.push_back(std::move(seq));
        --remaining;
      }
      if (!fresh.empty() && !Admit(fresh)) return;
      if (active_.empty()) continue;
      // One model step for every open sequence: verify a draft window or decode a token.
      std::vector<CheckedSequence*> all;
      for (auto& s : active_) all.push_back(s.get());
      // CommitDrafts acts on every layer, so draft windows need every layer played.
      const bool verify =
          m_.config.num_layers == m_.server_layers && rng_.Uniform() < o_.verify_fraction;
      const bool ok = verify ? VerifyStep(all) : DecodeStep(all);
      if (!ok) return;
      // Now and then fold a random half of the buffers.
      if (o_.flush_every > 0 && round % o_.flush_every == 0 && !FlushSome(all)) return;
      // Close sequences that reached their length.
      std::vector<uint64_t> done;
      for (auto& s : active_) {
        if (++s->steps_done >= s->lifetime_steps) done.push_back(s->id());
      }
      if (!done.empty()) {
        Reset(1);
        calls_[0]->mutable_close_sequences()->mutable_ids()->Assign(done.begin(), done.end());
        if (!RunCalls(1)) return;
        std::erase_if(active_, [](const std::unique_ptr<CheckedSequence>& s) {
          return s->steps_done >= s->lifetime_steps;
        });
      }
    }
  }

  // Closes every open sequence (the end of a session played for a number of rounds).
  void CloseAll() {
    if (active_.empty()) return;
    Reset(1);
    for (auto& s : active_) calls_[0]->mutable_close_sequences()->add_ids(s->id());
    if (RunCalls(1)) active_.clear();
  }

  // Opens `fresh` and prefills prompts of varied lengths on every layer.
  bool Admit(const std::vector<CheckedSequence*>& fresh) {
    std::vector<int32_t> tokens(fresh.size());
    for (size_t i = 0; i < fresh.size(); ++i) tokens[i] = PromptLength();
    for (int32_t t : tokens) {
      stats_.prefill_tokens += t;
      if (t < m_.stateless_limit) ++stats_.short_prompts;
    }
    stats_.sequences += static_cast<int64_t>(fresh.size());
    const int32_t layers = m_.config.num_layers;
    Reset(1 + layers);
    auto* open = calls_[0]->mutable_open_sequences();
    for (CheckedSequence* s : fresh) open->add_ids(s->id());
    for (int32_t l = 0; l < layers; ++l) {
      FillLayerCall(l, fresh, tokens, calls_[1 + l]->mutable_prefill());
    }
    if (!RunCalls(1 + layers)) return false;
    for (int32_t l = 0; l < layers; ++l) {
      if (!CheckLayer(LayerKind::kPrefill, l, fresh, tokens, *responses_[1 + l])) return false;
    }
    return true;
  }

  int32_t PromptLength() {
    const int32_t s = std::max(m_.stateless_limit, 1);
    const int32_t c = m_.flush_interval;
    switch (rng_.UniformInt(0, 3)) {
      case 0:
        return static_cast<int32_t>(rng_.UniformInt(1, std::max(1, s - 1)));  // stateless
      case 1:
        return static_cast<int32_t>(rng_.UniformInt(1, std::min(8, m_.max_prompt)));
      case 2:  // just over the stateless limit and a few flush boundaries
        return static_cast<int32_t>(
            std::min<int64_t>(m_.max_prompt, rng_.UniformInt(s, s + 2 * c + 3)));
      default:
        return static_cast<int32_t>(rng_.UniformInt(1, m_.max_prompt));
    }
  }

  bool DecodeStep(const std::vector<CheckedSequence*>& seqs) {
    const int32_t layers = m_.config.num_layers;
    std::vector<int32_t> tokens(seqs.size(), 1);
    Reset(layers);
    for (int32_t l = 0; l < layers; ++l) {
      FillLayerCall(l, seqs, tokens, calls_[l]->mutable_decode_step());
    }
    if (!RunCalls(layers)) return false;
    for (int32_t l = 0; l < layers; ++l) {
      if (!CheckLayer(LayerKind::kDecode, l, seqs, tokens, *responses_[l])) return false;
    }
    stats_.decode_tokens += static_cast<int64_t>(seqs.size());
    return true;
  }

  // Verifies a draft window on every layer, then commits a random accepted prefix.
  bool VerifyStep(const std::vector<CheckedSequence*>& seqs) {
    const int32_t layers = m_.config.num_layers;
    const int32_t most = std::max(1, std::min(o_.max_drafts, m_.max_drafts));
    std::vector<int32_t> drafts(seqs.size());
    std::vector<int32_t> accepted(seqs.size());
    for (size_t i = 0; i < seqs.size(); ++i) {
      drafts[i] = static_cast<int32_t>(rng_.UniformInt(1, most));
      accepted[i] = static_cast<int32_t>(rng_.UniformInt(0, drafts[i]));
    }
    Reset(layers + 1);
    for (int32_t l = 0; l < layers; ++l) {
      FillLayerCall(l, seqs, drafts, calls_[l]->mutable_verify_drafts());
    }
    auto* commit = calls_[layers]->mutable_commit_drafts();
    for (size_t i = 0; i < seqs.size(); ++i) {
      v1::CommitItem* item = commit->add_items();
      item->set_id(seqs[i]->id());
      item->set_position(seqs[i]->position(0));
      item->set_accepted(accepted[i]);
    }
    if (!RunCalls(layers + 1)) return false;
    for (int32_t l = 0; l < layers; ++l) {
      if (!CheckLayer(LayerKind::kVerify, l, seqs, drafts, *responses_[l])) return false;
    }
    for (size_t i = 0; i < seqs.size(); ++i) {
      seqs[i]->CommitDrafts(accepted[i]);
      stats_.drafts_verified += drafts[i];
      stats_.drafts_accepted += accepted[i];
    }
    return true;
  }

  bool FlushSome(const std::vector<CheckedSequence*>& seqs) {
    Reset(1);
    auto* flush = calls_[0]->mutable_flush();
    for (CheckedSequence* s : seqs) {
      if (rng_.Uniform() < 0.5) flush->add_ids(s->id());
    }
    if (flush->ids_size() == 0) return true;
    stats_.flushes += flush->ids_size();
    return RunCalls(1);
  }

  template <typename Request>
  void FillLayerCall(int32_t layer, const std::vector<CheckedSequence*>& seqs,
                     const std::vector<int32_t>& tokens, Request* request) {
    calls_builder_.Fill(layer, seqs, tokens, request);
  }

  // Checks a per-layer answer; a malformed answer is an error, an output off the oracle by more
  // than the tolerance a mismatch.
  bool CheckLayer(LayerKind kind, int32_t layer, const std::vector<CheckedSequence*>& seqs,
                  const std::vector<int32_t>& tokens, const v1::StreamResponse& response) {
    const v1::LayerOutput& out = response.layer_output();
    std::vector<int64_t> before(seqs.size());
    for (size_t i = 0; i < seqs.size(); ++i) before[i] = seqs[i]->position(layer);
    if (absl::Status s = calls_builder_.Check(kind, layer, seqs, tokens, out, &errors_); !s.ok()) {
      return Error(std::string(s.message()));
    }
    if (out.replayed()) ++stats_.replayed;
    for (size_t i = 0; i < seqs.size(); ++i) {
      const double err = errors_[i];
      ++stats_.checks;
      stats_.max_err = std::max(stats_.max_err, std::isnan(err) ? INFINITY : err);
      if (!(err <= m_.tolerance) && stats_.mismatches++ == 0) {
        stats_.first_mismatch =
            absl::StrCat(LayerKindName(kind), " layer ", layer, " sequence ", seqs[i]->id(),
                         " at position ", before[i], " (", tokens[i], " tokens): relative error ",
                         err, " > tolerance ", m_.tolerance);
      }
    }
    return true;
  }

  // Prepares n reusable call/response slots (cleared).
  void Reset(size_t n) {
    while (calls_.size() < n) {
      calls_.push_back(std::make_unique<v1::StreamRequest>());
      responses_.push_back(std::make_unique<v1::StreamResponse>());
    }
    for (size_t i = 0; i < n; ++i) {
      calls_[i]->Clear();
      responses_[i]->Clear();
    }
  }

  // Runs the first n prepared calls; every one must succeed.
  bool RunCalls(size_t n) {
    std::vector<v1::StreamRequest*> calls;
    std::vector<v1::StreamResponse*> responses;
    for (size_t i = 0; i < n; ++i) {
      calls.push_back(calls_[i].get());
      responses.push_back(responses_[i].get());
    }
    if (absl::Status s = transport_->Run(calls, responses); !s.ok()) {
      return Error(absl::StrCat(o_.mode, " transport: ", s.ToString()));
    }
    for (size_t i = 0; i < n; ++i) {
      if (absl::Status s = client::FromStreamResponse(*responses[i]); !s.ok()) {
        return Error(absl::StrCat(CallName(*calls[i]), ": ", s.ToString()));
      }
    }
    return true;
  }

  bool Error(std::string what) {
    if (stats_.first_error.empty()) {
      stats_.first_error = absl::StrCat("worker ", index_, ": ", what);
    }
    return false;
  }

  int index_;
  const MockSessionOptions& o_;
  const PlayedModel& m_;
  uint64_t next_id_;
  ActivationSource rng_;
  std::unique_ptr<client::Client> client_;
  std::unique_ptr<client::RoutedClient> routed_;  // with o_.servers, instead of client_
  std::unique_ptr<CallTransport> transport_;
  std::vector<std::unique_ptr<CheckedSequence>> active_;
  std::vector<std::unique_ptr<v1::StreamRequest>> calls_;
  std::vector<std::unique_ptr<v1::StreamResponse>> responses_;
  LayerCalls calls_builder_;
  std::vector<double> errors_;
  WorkerStats stats_;
};

}  // namespace

absl::StatusOr<MockSessionReport> RunMockSession(const MockSessionOptions& options) {
  if (options.mode != "unary" && options.mode != "stream") {
    return absl::InvalidArgumentError(
        absl::StrCat("mode is \"", options.mode, "\", expected unary or stream"));
  }
  if (options.concurrency < 1 || options.batch < 1) {
    return absl::InvalidArgumentError("concurrency and batch must be >= 1");
  }
  MockSessionReport report;
  report.options = options;
  const absl::Time start = absl::Now();
  client::ClientOptions copts;
  copts.tls = options.tls;
  copts.bearer_token = options.bearer_token;
  std::string described = options.server;  // the server (or first replica) described
  if (!options.servers.empty()) {
    if (options.mode != "unary") {
      return absl::InvalidArgumentError("routing over --servers sends unary calls only");
    }
    absl::StatusOr<std::vector<std::string>> replicas = client::ResolveReplicas(options.servers);
    if (!replicas.ok()) return replicas.status();
    for (const std::string& replica : *replicas) {
      absl::Status s =
          client::Client::Connect(replica, copts)->WaitUntilReady(options.wait_for_server);
      if (!s.ok()) return absl::Status(s.code(), absl::StrCat(replica, ": ", s.message()));
    }
    described = replicas->front();
  }
  std::unique_ptr<client::Client> client = client::Client::Connect(described, copts);
  if (absl::Status s = client->WaitUntilReady(options.wait_for_server); !s.ok()) return s;
  absl::StatusOr<v1::GetServerInfoResponse> info = client->GetServerInfo();
  if (!info.ok()) return info.status();
  report.info_before = *info;

  const v1::ModelShapes& shapes = info->model();
  ModelConfig full;
  full.name = shapes.name();
  full.num_layers = shapes.num_layers();
  full.num_k_heads = shapes.num_k_heads();
  full.num_v_heads = shapes.num_v_heads();
  full.head_k_dim = shapes.head_k_dim();
  full.head_v_dim = shapes.head_v_dim();
  full.conv_width = shapes.conv_width();
  full.param_seed = shapes.param_seed();
  if (std::string m = ValidateModelConfig(full); !m.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("server reports an unusable model: ", m));
  }
  if (shapes.params_source() != "seed") {
    return absl::FailedPreconditionError(
        absl::StrCat("server's layer parameters come from ", shapes.params_source(),
                     "; the mock worker can only rebuild parameters drawn from a seed"));
  }
  PlayedModel model;
  model.config = full;
  model.config.num_layers =
      options.layers > 0 ? std::min(options.layers, full.num_layers) : full.num_layers;
  model.params = MakeAllLayerParams(model.config);  // layer l's parameters depend on l only
  model.stateless_limit = info->buffer().stateless_limit();
  model.flush_interval = info->buffer().flush_interval();
  model.max_drafts = info->buffer().max_drafts();
  model.server_layers = full.num_layers;
  ChooseWorkload(options, &model);
  model.tolerance =
      options.tolerance > 0 ? options.tolerance : DefaultTolerance(*info, options.output_dtype);
  report.layers_played = model.config.num_layers;
  report.tolerance = model.tolerance;
  report.options.sequences = model.sequences;
  report.options.steps = model.steps;
  report.options.max_prompt = model.max_prompt;

  const uint64_t id_base = options.id_base != 0
                               ? options.id_base
                               : (SplitMix64(options.seed).Next() & 0xFFFFFFFF00000000ull);
  std::vector<std::unique_ptr<Worker>> workers;
  for (int i = 0; i < options.concurrency; ++i) {
    workers.push_back(
        std::make_unique<Worker>(i, options, model, id_base + (static_cast<uint64_t>(i) << 24)));
  }
  std::vector<std::thread> threads;
  for (auto& w : workers) threads.emplace_back([&w] { w->Run(); });
  for (std::thread& t : threads) t.join();

  for (auto& w : workers) {
    WorkerStats& s = w->stats();
    report.sequences += s.sequences;
    report.short_prompts += s.short_prompts;
    report.prefill_tokens += s.prefill_tokens;
    report.decode_tokens += s.decode_tokens;
    report.drafts_verified += s.drafts_verified;
    report.drafts_accepted += s.drafts_accepted;
    report.flushes += s.flushes;
    report.replayed_answers += s.replayed;
    report.checks += s.checks;
    report.max_relative_error = std::max(report.max_relative_error, s.max_err);
    report.mismatches += s.mismatches;
    if (report.first_mismatch.empty()) report.first_mismatch = s.first_mismatch;
    if (report.first_error.empty()) report.first_error = s.first_error;
    report.latencies.Merge(s.latencies);
  }
  report.wall = absl::Now() - start;
  absl::StatusOr<v1::GetServerInfoResponse> after = client->GetServerInfo();
  if (after.ok()) report.info_after = *after;
  return report;
}

}  // namespace kvbuffer::mock
