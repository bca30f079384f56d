// Bearer-token authentication: a table of tokens, each naming the tenant it acts for (read from
// --auth_tokens_file), and the token a call carries in its `authorization: Bearer <token>`
// metadata.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvbuffer::server {

// Tokens shorter than this are refused when the table is read (they are guessable).
inline constexpr size_t kMinTokenLength = 16;

class TokenTable {
 public:
  // Parses `text`: one "<token> <tenant>" pair per line, separated by spaces or tabs; '#' starts a
  // comment; blank lines are skipped. Tokens are at least kMinTokenLength printable ASCII
  // characters and unique; tenants are 1..128 characters of [A-Za-z0-9._:@/=+-]. INVALID_ARGUMENT
  // naming `source` and the line otherwise (the token itself is never echoed).
  static absl::StatusOr<TokenTable> Parse(absl::string_view text,
                                          absl::string_view source = "tokens");

  // Reads and parses the file at `path` (NOT_FOUND when it cannot be read).
  static absl::StatusOr<TokenTable> Load(const std::string& path);

  // The tenant `token` acts for, or nullopt. Every entry is compared, each in time that does not
  // depend on where the bytes differ.
  std::optional<std::string> TenantOf(absl::string_view token) const;

  // Tokens in the table.
  size_t size() const { return entries_.size(); }

 private:
  std::vector<std::pair<std::string, std::string>> entries_;  // token, tenant
};

// The token of an `authorization` metadata value "Bearer <token>" (scheme case-insensitive,
// surrounding spaces ignored), or nullopt when the value is not of that form.
std::optional<absl::string_view> BearerTokenOf(absl::string_view authorization);

}  // namespace kvbuffer::server
