// TLS, mutual TLS, bearer tokens and tenants, over the wire: only authenticated callers reach the
// API, each in its own namespace of sequence ids (another tenant's sequences are NOT_FOUND for
// every call), with per-tenant quotas, while health stays reachable for probes. Certificates are
// made for each test by the openssl command line.
#include <signal.h>

#include <chrono>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "client/cpp/client_credentials.h"
#include "client/cpp/client_status.h"
#include "client/cpp/kvbuffer_client.h"
#include "client/mock_worker/mock_session.h"
#include "client/mock_worker/session_report.h"
#include "gmock/gmock.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "gtest/gtest.h"
#include "service/server/bearer_auth.h"
#include "tests/integration/test_certs.h"
#include "tests/integration/test_servers.h"
#include "tests/integration/wire_driver.h"

namespace kvbuffer::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using HealthResponse = grpc::health::v1::HealthCheckResponse;

#define ASSERT_OK(expr)                          \
  do {                                           \
    const absl::Status _s = (expr);              \
    ASSERT_TRUE(_s.ok()) << #expr << ": " << _s; \
  } while (0)

constexpr char kTokenA[] = "kvb-test-token-aaaaaaaaaaaaaaaa";
constexpr char kTokenB[] = "kvb-test-token-bbbbbbbbbbbbbbbb";
constexpr char kTokens[] =
    "# token tenant\n"
    "kvb-test-token-aaaaaaaaaaaaaaaa tenant-a\n"
    "kvb-test-token-bbbbbbbbbbbbbbbb   tenant-b   # a comment\n";

std::shared_ptr<const server::TokenTable> Tokens() {
  absl::StatusOr<server::TokenTable> t = server::TokenTable::Parse(kTokens);
  EXPECT_TRUE(t.ok()) << t.status();
  return std::make_shared<const server::TokenTable>(*std::move(t));
}

client::CallOptions Once() {
  client::CallOptions o;
  o.max_attempts = 1;
  o.timeout = absl::Seconds(10);
  return o;
}

client::ClientOptions WithToken(const std::string& token) {
  client::ClientOptions o;
  o.bearer_token = token;
  return o;
}

// Asks grpc.reflection on `channel` for the list of services, sending `token` when not empty:
// the status of the Stream when it ends without an answer (UNIMPLEMENTED where reflection is not
// served).
absl::Status ListServicesByReflection(const std::shared_ptr<grpc::Channel>& channel,
                                      const std::string& token = "") {
  auto stub = grpc::reflection::v1alpha::ServerReflection::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  client::AddBearerToken(token, &context);
  auto stream = stub->ServerReflectionInfo(&context);
  grpc::reflection::v1alpha::ServerReflectionRequest request;
  request.set_list_services("*");
  grpc::reflection::v1alpha::ServerReflectionResponse response;
  if (stream->Write(request) && stream->Read(&response)) {
    context.TryCancel();
    stream->Finish().ok();  // CANCELLED, by us
    return absl::OkStatus();
  }
  return client::FromGrpcStatus(stream->Finish());
}

class SecurityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<TestCerts> certs = MakeTestCerts();
    ASSERT_TRUE(certs.ok()) << certs.status();
    certs_ = *std::move(certs);
  }

  // TLS options trusting the test CA, with the client certificate `cert`/`key` (may be empty).
  client::ClientOptions Tls(const std::string& cert = "", const std::string& key = "",
                            const std::string& ca = "") {
    client::ClientOptions o;
    o.tls.enabled = true;
    o.tls.root_certs_pem = ca.empty() ? certs_.ca_pem : ca;
    o.tls.cert_chain_pem = cert;
    o.tls.private_key_pem = key;
    return o;
  }

  server::ServerOptions TlsServer(bool mutual) {
    server::ServerOptions o;
    o.tls.cert_file = certs_.server_cert;
    o.tls.key_file = certs_.server_key;
    if (mutual) {
      o.tls.client_ca_file = certs_.ca_file;
      o.tls.require_client_cert = true;
    }
    return o;
  }

  TestCerts certs_;
};

TEST_F(SecurityTest, TlsServesOnlyTlsClientsAndTheOracleStillAgrees) {
  auto server = InProcessServer::Start(SmallModelOptions(), TlsServer(false));
  ASSERT_NE(server, nullptr);
  // A mock worker over TLS: every output checked against its fp64 oracle.
  mock::MockSessionOptions o;
  o.server = server->address();
  o.mode = "stream";
  o.concurrency = 2;
  o.sequences = 4;
  o.steps = 8;
  o.tls = Tls().tls;
  absl::StatusOr<mock::MockSessionReport> report = mock::RunMockSession(o);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->ok()) << mock::FormatReport(*report);
  EXPECT_GT(report->checks, 50);
  EXPECT_EQ(report->mismatches, 0);

  // Plaintext, and TLS trusting another CA, never get an answer.
  auto plain = client::Client::Connect(server->address());
  absl::Status s = plain->GetServerInfo({}, Once()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  std::string rogue_ca;
  {
    std::ifstream in(certs_.dir + "/rogue-ca.pem");
    rogue_ca.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto wrong_ca = client::Client::Connect(server->address(), Tls("", "", rogue_ca));
  s = wrong_ca->GetServerInfo({}, Once()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  auto good = client::Client::Connect(server->address(), Tls());
  ASSERT_OK(good->GetServerInfo({}, Once()).status());
}

TEST_F(SecurityTest, MutualTlsRefusesClientsWithoutAVerifiedCertificate) {
  auto server = InProcessServer::Start(SmallModelOptions(), TlsServer(true));
  ASSERT_NE(server, nullptr);
  for (auto [name, opts] :
       {std::pair<const char*, client::ClientOptions>{"no certificate", Tls()},
        {"certificate of another CA", Tls(certs_.rogue_cert, certs_.rogue_key)}}) {
    SCOPED_TRACE(name);
    auto c = client::Client::Connect(server->address(), opts);
    absl::Status s = c->GetServerInfo({}, Once()).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  }
  WireDriver d(server->address(), "stream", 3, Tls(certs_.client_a_cert, certs_.client_a_key));
  ASSERT_OK(d.Init());
  auto* a = d.NewSequence(1);
  ASSERT_OK(d.Open({a}));
  ASSERT_OK(d.Prefill({a}, {30}));
  ASSERT_OK(d.Decode({a}));
  ASSERT_OK(d.Close({a}));
}

TEST_F(SecurityTest, AClientCertificateNamesTheTenantAndATokenTakesPrecedence) {
  server::ServerOptions o = TlsServer(true);
  o.auth.tenant_from_client_cert = true;
  o.auth.tokens = Tokens();
  auto server = InProcessServer::Start(SmallModelOptions(), o);
  ASSERT_NE(server, nullptr);
  WireDriver a(server->address(), "unary", 4, Tls(certs_.client_a_cert, certs_.client_a_key));
  ASSERT_OK(a.Init());
  auto* seq = a.NewSequence(5);
  ASSERT_OK(a.Open({seq}));
  ASSERT_OK(a.Prefill({seq}, {9}));
  EXPECT_TRUE(server->engine()->Describe("tenant-a", 5).ok());  // the certificate's CN
  EXPECT_FALSE(server->engine()->Describe("", 5).ok());

  // Tenant b (its own certificate) does not see sequence 5 of tenant a.
  WireDriver b(server->address(), "unary", 4, Tls(certs_.client_b_cert, certs_.client_b_key));
  ASSERT_OK(b.Init());
  absl::Status s = client::FromStreamResponse(b.Run(b.DecodeCall(0, {seq})));
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  // With tenant a's token, b's connection acts for tenant a.
  client::ClientOptions b_with_a_token = Tls(certs_.client_b_cert, certs_.client_b_key);
  b_with_a_token.bearer_token = kTokenA;
  auto c = client::Client::Connect(server->address(), b_with_a_token);
  ASSERT_OK(c->Flush({seq->id()}, Once()));
  ASSERT_OK(a.Decode({seq}));  // the flush changed no output
  ASSERT_OK(a.Close({seq}));
}

class TokenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(TokenTest, EveryApiCallNeedsAValidTokenButHealthDoesNot) {
  server::ServerOptions o;
  o.auth.tokens = Tokens();
  auto server = InProcessServer::Start(SmallModelOptions(), o);
  ASSERT_NE(server, nullptr);
  const std::string& mode = GetParam();
  struct Case {
    std::string name;
    std::string token;   // "" = no metadata
    std::string header;  // set instead of a token when not empty
    std::string message;
  } cases[] = {
      {"no token", "", "", "no authorization metadata"},
      {"unknown token", "kvb-test-token-cccccccccccccccc", "", "bearer token is not valid"},
      {"not a bearer token", "", "Basic a3ZiOnB3", "not of the form \"Bearer <token>\""},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    absl::Status s;
    if (!c.header.empty()) {
      // A raw authorization value: only the stub lets us send one.
      auto raw = client::Client::Connect(server->address());
      grpc::ClientContext context;
      context.AddMetadata("authorization", c.header);
      v1::GetServerInfoResponse info;
      s = client::FromGrpcStatus(raw->stub()->GetServerInfo(&context, {}, &info));
    } else {
      auto cl = client::Client::Connect(server->address(), WithToken(c.token));
      if (mode == "stream") {
        auto stream = cl->OpenStream(absl::Seconds(10));
        s = stream->GetServerInfo({}).status();
      } else {
        const uint64_t id = 1;
        s = cl->OpenSequences({&id, 1}, Once());
      }
    }
    EXPECT_EQ(s.code(), absl::StatusCode::kUnauthenticated) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.message));
    EXPECT_THAT(std::string(s.message()), Not(HasSubstr("cccccccc")));  // never echoed
  }
  EXPECT_EQ(server->engine()->Info().open_sequences, 0);  // nothing got through

  // Health needs no token.
  auto anonymous = client::Client::Connect(server->address());
  for (const char* name : {"liveness", "readiness"}) {
    absl::StatusOr<client::ServingStatus> h = anonymous->CheckHealth(name);
    ASSERT_TRUE(h.ok()) << h.status();
    EXPECT_EQ(*h, HealthResponse::SERVING);
  }

  // A valid token works, and its calls land in its tenant's namespace.
  WireDriver d(server->address(), mode, 6, WithToken(kTokenA));
  ASSERT_OK(d.Init());
  auto* a = d.NewSequence(9);
  ASSERT_OK(d.Open({a}));
  ASSERT_OK(d.Prefill({a}, {21}));
  ASSERT_OK(d.Decode({a}));
  EXPECT_TRUE(server->engine()->Describe("tenant-a", 9).ok());
  ASSERT_OK(d.Close({a}));
}

TEST_P(TokenTest, OneTenantCanNeitherReadExtendCommitFlushNorCloseAnothersSequences) {
  server::ServerOptions o;
  o.auth.tokens = Tokens();
  auto server = InProcessServer::Start(SmallModelOptions(), o);
  ASSERT_NE(server, nullptr);
  WireDriver a(server->address(), GetParam(), 7, WithToken(kTokenA));
  WireDriver b(server->address(), GetParam(), 8, WithToken(kTokenB));
  ASSERT_OK(a.Init());
  ASSERT_OK(b.Init());
  auto* mine = a.NewSequence(42);
  ASSERT_OK(a.Open({mine}));
  ASSERT_OK(a.Prefill({mine}, {20}));
  ASSERT_OK(a.Verify({mine}, {3}));  // drafts pending: a commit by b would have something to do

  // Tenant b names a's sequence 42 in every call: NOT_FOUND each time, nothing changes.
  const int64_t pos = mine->position(0);
  std::vector<std::pair<std::string, v1::StreamRequest>> calls;
  calls.emplace_back("DecodeStep", b.DecodeCall(0, {mine}));
  {
    v1::StreamRequest prefill;
    *prefill.mutable_prefill()->mutable_sequences() = calls[0].second.decode_step().sequences();
    *prefill.mutable_prefill()->mutable_qkv() = calls[0].second.decode_step().qkv();
    *prefill.mutable_prefill()->mutable_a() = calls[0].second.decode_step().a();
    *prefill.mutable_prefill()->mutable_b() = calls[0].second.decode_step().b();
    calls.emplace_back("Prefill", prefill);
    v1::StreamRequest verify;
    *verify.mutable_verify_drafts()->mutable_sequences() = prefill.prefill().sequences();
    *verify.mutable_verify_drafts()->mutable_qkv() = prefill.prefill().qkv();
    *verify.mutable_verify_drafts()->mutable_a() = prefill.prefill().a();
    *verify.mutable_verify_drafts()->mutable_b() = prefill.prefill().b();
    calls.emplace_back("VerifyDrafts", verify);
  }
  {
    v1::StreamRequest commit;
    v1::CommitItem* item = commit.mutable_commit_drafts()->add_items();
    item->set_id(42);
    item->set_position(pos);
    item->set_accepted(1);
    calls.emplace_back("CommitDrafts", commit);
    v1::StreamRequest flush;
    flush.mutable_flush()->add_ids(42);
    calls.emplace_back("Flush", flush);
    v1::StreamRequest close;
    close.mutable_close_sequences()->add_ids(42);
    calls.emplace_back("CloseSequences", close);
  }
  for (auto& [name, call] : calls) {
    SCOPED_TRACE(name);
    absl::Status s = client::FromStreamResponse(b.Run(call));
    EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("42"));
  }
  absl::StatusOr<SequenceInfo> info = server->engine()->Describe("tenant-a", 42);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->positions[0], pos);
  EXPECT_EQ(info->pending_drafts, 3);

  // b may use the same id in its own namespace; both sequences go on, each on its own oracle.
  auto* theirs = b.NewSequence(42);
  ASSERT_OK(b.Open({theirs}));
  ASSERT_OK(b.Prefill({theirs}, {5}));
  ASSERT_OK(a.Commit({mine}, {2}));
  ASSERT_OK(a.Decode({mine}));
  ASSERT_OK(b.Decode({theirs}));
  EXPECT_EQ(server->engine()->Describe("tenant-b", 42)->positions[0], 6);
  EXPECT_EQ(server->engine()->Describe("tenant-a", 42)->positions[0], pos + 3);
  ASSERT_OK(b.Close({theirs}));
  ASSERT_OK(a.Decode({mine}));  // b's close touched only b's sequence
  ASSERT_OK(a.Close({mine}));
  const EngineInfo after = server->engine()->Info();
  EXPECT_EQ(after.open_sequences, 0);
  EXPECT_EQ(after.free_state_slots, SmallModelOptions().state_slots);
  EXPECT_EQ(after.free_buffer_pages, SmallModelOptions().buffer_pages);
}

TEST_P(TokenTest, EachTenantHasItsOwnSequenceQuota) {
  EngineOptions e = SmallModelOptions();
  e.max_sequences_per_tenant = 2;
  server::ServerOptions o;
  o.auth.tokens = Tokens();
  auto server = InProcessServer::Start(e, o);
  ASSERT_NE(server, nullptr);
  WireDriver a(server->address(), GetParam(), 1, WithToken(kTokenA));
  WireDriver b(server->address(), GetParam(), 2, WithToken(kTokenB));
  ASSERT_OK(a.Init());
  ASSERT_OK(b.Init());
  auto* a1 = a.NewSequence(1);
  auto* a2 = a.NewSequence(2);
  auto* a3 = a.NewSequence(3);
  ASSERT_OK(a.Open({a1, a2}));
  absl::Status s = a.Open({a3});
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("max_sequences_per_tenant=2"));
  auto* b1 = b.NewSequence(1);
  auto* b2 = b.NewSequence(2);
  ASSERT_OK(b.Open({b1, b2}));  // b's quota is its own
  ASSERT_OK(a.Close({a1}));
  ASSERT_OK(a.Open({a3}));
  ASSERT_OK(a.Prefill({a2, a3}, {4, 70}));
  ASSERT_OK(b.Prefill({b1, b2}, {70, 4}));
  ASSERT_OK(a.Close({a2, a3}));
  ASSERT_OK(b.Close({b1, b2}));
}

TEST_P(TokenTest, GetServerInfoCountsOnlyTheCallersOwnSequences) {
  server::ServerOptions o;
  o.auth.tokens = Tokens();
  auto server = InProcessServer::Start(SmallModelOptions(), o);
  ASSERT_NE(server, nullptr);
  WireDriver a(server->address(), GetParam(), 1, WithToken(kTokenA));
  WireDriver b(server->address(), GetParam(), 2, WithToken(kTokenB));
  ASSERT_OK(a.Init());
  ASSERT_OK(b.Init());
  ASSERT_OK(a.Open({a.NewSequence(1), a.NewSequence(2), a.NewSequence(3)}));
  ASSERT_OK(b.Open({b.NewSequence(1)}));
  auto open_as_seen_by = [](WireDriver& d) -> int32_t {
    v1::StreamRequest info;
    info.mutable_get_server_info();
    v1::StreamResponse r = d.Run(std::move(info));
    EXPECT_EQ(r.status_code(), 0) << r.status_message();
    return r.get_server_info().capacity().open_sequences();
  };
  EXPECT_EQ(open_as_seen_by(a), 3);
  EXPECT_EQ(open_as_seen_by(b), 1);
  EXPECT_EQ(server->engine()->Info().open_sequences, 4);  // the server's own total
}

INSTANTIATE_TEST_SUITE_P(Transports, TokenTest, ::testing::Values("unary", "stream"),
                         [](const auto& info) { return info.param; });

TEST_F(SecurityTest, TheHealthPortAnswersProbesInPlaintextAndExposesNoApi) {
  const std::string tokens = certs_.dir + "/tokens";
  {
    std::ofstream f(tokens);
    f << kTokens;
  }
  absl::StatusOr<std::unique_ptr<ChildServer>> started = ChildServer::Start(
      {"--model=tiny", "--tls_cert=" + certs_.server_cert, "--tls_key=" + certs_.server_key,
       "--auth_tokens_file=" + tokens, "--health_port=0"});
  ASSERT_TRUE(started.ok()) << started.status();
  ChildServer& server = **started;
  absl::StatusOr<std::string> line = server.ReadStdoutLine(absl::Seconds(10));
  ASSERT_TRUE(line.ok()) << line.status();
  absl::string_view health_address = *line;
  ASSERT_TRUE(absl::ConsumePrefix(&health_address, "health on ")) << *line;
  EXPECT_THAT(server.Stderr(), HasSubstr("API port TLS, authentication bearer tokens"));

  auto probe = client::Client::Connect(std::string(health_address));  // plaintext, no token
  for (const char* name : {"", "liveness", "readiness"}) {
    absl::StatusOr<client::ServingStatus> h = probe->CheckHealth(name);
    ASSERT_TRUE(h.ok()) << name << ": " << h.status();
    EXPECT_EQ(*h, HealthResponse::SERVING) << name;
  }
  // The health port serves no API method, even with a valid token, and no reflection.
  auto api_on_health = client::Client::Connect(std::string(health_address), WithToken(kTokenA));
  absl::Status s = api_on_health->GetServerInfo({}, Once()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented) << s;
  s = ListServicesByReflection(probe->channel());
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented) << s;
  // With bearer tokens the API port does not serve reflection either (it cannot check tokens),
  // and GetServerInfo does not list the feature.
  auto tls_a = client::Client::Connect(server.address(), [&] {
    client::ClientOptions o = WithToken(kTokenA);
    o.tls.enabled = true;
    o.tls.root_certs_pem = certs_.ca_pem;
    return o;
  }());
  absl::StatusOr<v1::GetServerInfoResponse> info = tls_a->GetServerInfo({}, Once());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_THAT(info->features(), Not(::testing::Contains("reflection")));
  EXPECT_THAT(info->features(), ::testing::Contains("bearer_auth"));
  s = ListServicesByReflection(tls_a->channel());
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented) << s;
  s = ListServicesByReflection(tls_a->channel(), kTokenA);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented) << s;
  // The API port speaks TLS only; with TLS and a token the mock worker passes.
  auto plain = client::Client::Connect(server.address(), WithToken(kTokenA));
  s = plain->GetServerInfo({}, Once()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  std::string out;
  absl::StatusOr<int> code =
      RunProgram({MockWorkerBinary(), "--server=" + server.address(), "--tls_ca=" + certs_.ca_file,
                  std::string("--token=") + kTokenB, "--sequences=3", "--steps=6", "--mode=stream"},
                 &out, absl::Seconds(60));
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 0) << out;
  EXPECT_THAT(out, HasSubstr("0 mismatch(es)"));
  // Without the token the mock worker cannot even describe the server.
  code = RunProgram({MockWorkerBinary(), "--server=" + server.address(),
                     "--tls_ca=" + certs_.ca_file, "--sequences=1", "--steps=1"},
                    &out, absl::Seconds(60));
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 2) << out;

  // Draining shows on the health port too.
  server.Signal(SIGTERM);
  absl::StatusOr<client::ServingStatus> ready;
  const absl::Time until = absl::Now() + absl::Seconds(10);
  do {
    ready = probe->CheckHealth("readiness");
  } while (ready.ok() && *ready == HealthResponse::SERVING && absl::Now() < until);
  if (ready.ok()) {
    EXPECT_EQ(*ready, HealthResponse::NOT_SERVING);
  }
  absl::StatusOr<int> exit_code = server.WaitExit(absl::Seconds(30));
  ASSERT_TRUE(exit_code.ok()) << exit_code.status() << server.Stderr();
  EXPECT_EQ(*exit_code, 0) << server.Stderr();
}

TEST(SecurityFlagsTest, InconsistentSecurityFlagsFailFastWithAMessage) {
  const std::string dir = ::testing::TempDir();
  const std::string short_tokens = dir + "/kvb_short_tokens";
  {
    std::ofstream f(short_tokens);
    f << "short tenant-a\n";
  }
  const std::string pem = dir + "/kvb_not_pem";
  {
    std::ofstream f(pem);
    f << "not a certificate\n";
  }
  struct Case {
    std::vector<std::string> args;
    std::string message;
  } cases[] = {
      {{"--model=tiny", "--tls_cert=" + pem}, "--tls_cert and --tls_key must be given together"},
      {{"--model=tiny", "--require_client_cert"}, "--require_client_cert needs --tls_client_ca"},
      {{"--model=tiny", "--tls_client_ca=" + pem}, "--tls_client_ca needs --tls_cert"},
      {{"--model=tiny", "--tls_cert=" + pem, "--tls_key=" + pem}, "holds no PEM block"},
      {{"--model=tiny", "--tls_cert=/no/such.pem", "--tls_key=/no/such.key"}, "cannot read"},
      {{"--model=tiny", "--auth_tokens_file=" + short_tokens},
       "line 1: the token has 5 characters, expected at least 16"},
      {{"--model=tiny", "--auth_tokens_file=/no/such/file"}, "--auth_tokens_file: cannot read"},
      {{"--model=tiny", "--tenant_from_client_cert"}, "--tenant_from_client_cert needs mutual TLS"},
      {{"--model=tiny", "--max_sequences_per_tenant=-1"}, "max_sequences_per_tenant"},
      {{"--model=tiny", "--health_port=70000"}, "--health_port must be"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.args.back());
    absl::StatusOr<std::unique_ptr<ChildServer>> server = ChildServer::Start(c.args);
    ASSERT_FALSE(server.ok());
    EXPECT_THAT(std::string(server.status().message()), HasSubstr(c.message));
  }
}

TEST(TokenTableTest, ParsesLinesAndRefusesWeakOrAmbiguousEntries) {
  absl::StatusOr<server::TokenTable> t = server::TokenTable::Parse(kTokens);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->size(), 2u);
  EXPECT_EQ(t->TenantOf(kTokenA).value_or("?"), "tenant-a");
  EXPECT_EQ(t->TenantOf(kTokenB).value_or("?"), "tenant-b");
  EXPECT_FALSE(t->TenantOf("kvb-test-token-aaaaaaaaaaaaaaa").has_value());    // a prefix
  EXPECT_FALSE(t->TenantOf("kvb-test-token-aaaaaaaaaaaaaaaaa").has_value());  // longer
  EXPECT_FALSE(t->TenantOf("").has_value());
  for (const char* bad :
       {"kvb-test-token-aaaaaaaaaaaaaaaa\n",  // no tenant
        "kvb-test-token-aaaaaaaaaaaaaaaa a b\n", "kvb-test-token-aaaaaaaaaaaaaaaa te\"nant\n",
        "kvb-test-token-aaaaaaaaaaaaaaaa a\nkvb-test-token-aaaaaaaaaaaaaaaa b\n"}) {
    absl::StatusOr<server::TokenTable> r = server::TokenTable::Parse(bad, "f");
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(r.status().message()), Not(HasSubstr("aaaaaaaa"))) << bad;
  }
  EXPECT_EQ(server::BearerTokenOf("Bearer abc").value_or("?"), "abc");
  EXPECT_EQ(server::BearerTokenOf("  bearer   abc ").value_or("?"), "abc");
  EXPECT_FALSE(server::BearerTokenOf("Bearer ").has_value());
  EXPECT_FALSE(server::BearerTokenOf("Basic abc").has_value());
  EXPECT_FALSE(server::BearerTokenOf("Bearerabc").has_value());
}

}  // namespace
}  // namespace kvbuffer::testing
