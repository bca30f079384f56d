#include "service/server/bearer_auth.h"

#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace kvbuffer::server {

namespace {

bool IsTenantChar(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == ':' ||
         c == '@' || c == '/' || c == '=' || c == '+' || c == '-';
}

bool IsTokenChar(char c) { return c > ' ' && c < 127; }

// Equal contents, in time that depends only on the length of `secret`.
bool ConstantTimeEquals(absl::string_view given, absl::string_view secret) {
  unsigned diff = given.size() == secret.size() ? 0u : 1u;
  for (size_t i = 0; i < secret.size(); ++i) {
    const unsigned char g = i < given.size() ? static_cast<unsigned char>(given[i]) : 0;
    diff |= g ^ static_cast<unsigned char>(secret[i]);
  }
  return diff == 0;
}

}  // namespace

absl::StatusOr<TokenTable> TokenTable::Parse(absl::string_view text, absl::string_view source) {
  TokenTable table;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    if (const size_t hash = line.find('#'); hash != absl::string_view::npos) {
      line = line.substr(0, hash);
    }
    line = absl::StripAsciiWhitespace(line);
    if (line.empty()) continue;
    std::vector<absl::string_view> parts =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    const std::string where = absl::StrCat(source, " line ", line_no);
    if (parts.size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": expected \"<token> <tenant>\", got ", parts.size(), " field(s)"));
    }
    const absl::string_view token = parts[0], tenant = parts[1];
    if (token.size() < kMinTokenLength) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": the token has ", token.size(),
                                                     " characters, expected at least ",
                                                     kMinTokenLength));
    }
    for (char c : token) {
      if (!IsTokenChar(c)) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": the token must be printable ASCII without spaces"));
      }
    }
    if (tenant.size() > 128) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": tenant has ", tenant.size(), " characters, expected at most 128"));
    }
    for (char c : tenant) {
      if (!IsTenantChar(c)) {
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": tenant \"", tenant, "\" may only hold letters, digits and ._:@/=+-"));
      }
    }
    for (const auto& [known, unused] : table.entries_) {
      if (known == token) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": the token is listed twice; each token names one tenant"));
      }
    }
    table.entries_.emplace_back(std::string(token), std::string(tenant));
  }
  return table;
}

absl::StatusOr<TokenTable> TokenTable::Load(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream text;
  text << in.rdbuf();
  return Parse(text.str(), path);
}

std::optional<std::string> TokenTable::TenantOf(absl::string_view token) const {
  const std::string* found = nullptr;
  for (const auto& [known, tenant] : entries_) {
    if (ConstantTimeEquals(token, known) && found == nullptr) found = &tenant;
  }
  if (found == nullptr) return std::nullopt;
  return *found;
}

std::optional<absl::string_view> BearerTokenOf(absl::string_view authorization) {
  absl::string_view v = absl::StripAsciiWhitespace(authorization);
  constexpr absl::string_view kScheme = "bearer ";
  if (v.size() <= kScheme.size() || !absl::StartsWithIgnoreCase(v, kScheme)) return std::nullopt;
  v = absl::StripLeadingAsciiWhitespace(v.substr(kScheme.size()));
  if (v.empty()) return std::nullopt;
  return v;
}

}  // namespace kvbuffer::server
