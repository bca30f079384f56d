#include "service/server/json_log.h"

#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kvbuffer::server {

namespace {

// This absl's string_view is its own type.
absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// Length of the valid UTF-8 sequence starting at text[i], or 0 if it is not one.
size_t Utf8SequenceLength(std::string_view text, size_t i) {
  const auto c = static_cast<unsigned char>(text[i]);
  size_t n = 0;
  uint32_t min = 0;
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
    min = 0x80;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    min = 0x800;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    min = 0x10000;
  } else {
    return 0;
  }
  if (i + n > text.size()) return 0;
  uint32_t cp = c & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) {
    const auto d = static_cast<unsigned char>(text[i + k]);
    if ((d & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (d & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return n;
}

// A text-format value: bare when it has no spaces, quotes, '=' or control characters.
std::string TextValue(const std::string& s) {
  bool bare = !s.empty();
  for (char c : s) {
    if (static_cast<unsigned char>(c) <= 0x20 || c == '"' || c == '=' || c == '\\') bare = false;
  }
  return bare ? s : absl::StrCat("\"", JsonEscape(s), "\"");
}

std::string Number(double v) {
  if (!std::isfinite(v)) return "null";  // JSON has no NaN or infinities
  return absl::StrFormat("%.6g", v);
}

}  // namespace

std::string_view LogLevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarning:
      return "warning";
    case LogLevel::kError:
      return "error";
  }
  return "info";
}

absl::StatusOr<LogLevel> ParseLogLevel(std::string_view name) {
  const std::string n = absl::AsciiStrToLower(Sv(name));
  if (n == "debug") return LogLevel::kDebug;
  if (n == "info") return LogLevel::kInfo;
  if (n == "warning" || n == "warn") return LogLevel::kWarning;
  if (n == "error") return LogLevel::kError;
  return absl::InvalidArgumentError(
      absl::StrCat("log level must be debug, info, warning or error, got \"", Sv(name), "\""));
}

absl::StatusOr<LogFormat> ParseLogFormat(std::string_view name) {
  if (name == "json") return LogFormat::kJson;
  if (name == "text") return LogFormat::kText;
  return absl::InvalidArgumentError(
      absl::StrCat("log format must be json or text, got \"", Sv(name), "\""));
}

std::string JsonEscape(std::string_view text) {
  std::string out;
  out.reserve(text.size() + 8);
  for (size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c < 0x80) {
      switch (c) {
        case '"':
          out += "\\\"";
          break;
        case '\\':
          out += "\\\\";
          break;
        case '\n':
          out += "\\n";
          break;
        case '\r':
          out += "\\r";
          break;
        case '\t':
          out += "\\t";
          break;
        case '\b':
          out += "\\b";
          break;
        case '\f':
          out += "\\f";
          break;
        default:
          if (c < 0x20 || c == 0x7F) {
            absl::StrAppendFormat(&out, "\\u%04x", c);
          } else {
            out += static_cast<char>(c);
          }
      }
      ++i;
      continue;
    }
    const size_t n = Utf8SequenceLength(text, i);
    if (n == 0) {
      out += "\\ufffd";
      ++i;
    } else {
      out.append(text.data() + i, n);
      i += n;
    }
  }
  return out;
}

std::string Rfc3339Utc(absl::Time t) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", t, absl::UTCTimeZone());
}

std::string FormatLogLine(LogFormat format, absl::Time time, LogLevel level, std::string_view event,
                          const std::vector<LogField>& fields) {
  std::string line;
  if (format == LogFormat::kJson) {
    absl::StrAppend(&line, "{\"timestamp\":\"", Rfc3339Utc(time), "\",\"level\":\"",
                    Sv(LogLevelName(level)), "\",\"event\":\"", JsonEscape(event), "\"");
    for (const LogField& f : fields) {
      absl::StrAppend(&line, ",\"", JsonEscape(f.key), "\":");
      if (const auto* s = std::get_if<std::string>(&f.value)) {
        absl::StrAppend(&line, "\"", JsonEscape(*s), "\"");
      } else if (const auto* i = std::get_if<int64_t>(&f.value)) {
        absl::StrAppend(&line, *i);
      } else if (const auto* u = std::get_if<uint64_t>(&f.value)) {
        absl::StrAppend(&line, *u);
      } else if (const auto* d = std::get_if<double>(&f.value)) {
        absl::StrAppend(&line, Number(*d));
      } else {
        absl::StrAppend(&line, std::get<bool>(f.value) ? "true" : "false");
      }
    }
    line += "}";
    return line;
  }
  absl::StrAppend(&line, Rfc3339Utc(time), " ", absl::AsciiStrToUpper(Sv(LogLevelName(level))), " ",
                  TextValue(std::string(event)));
  for (const LogField& f : fields) {
    absl::StrAppend(&line, " ", f.key, "=");
    if (const auto* s = std::get_if<std::string>(&f.value)) {
      absl::StrAppend(&line, TextValue(*s));
    } else if (const auto* i = std::get_if<int64_t>(&f.value)) {
      absl::StrAppend(&line, *i);
    } else if (const auto* u = std::get_if<uint64_t>(&f.value)) {
      absl::StrAppend(&line, *u);
    } else if (const auto* d = std::get_if<double>(&f.value)) {
      absl::StrAppend(&line, Number(*d));
    } else {
      absl::StrAppend(&line, std::get<bool>(f.value) ? "true" : "false");
    }
  }
  return line;
}

LogWriter::LogWriter(LogFormat format, LogLevel min_level, FILE* out)
    : format_(format), min_level_(min_level), out_(out) {}

void LogWriter::Log(LogLevel level, std::string_view event, const std::vector<LogField>& fields) {
  if (!Enabled(level)) return;
  std::string line = FormatLogLine(format_, absl::Now(), level, event, fields);
  line += '\n';
  absl::MutexLock lock(&mu_);
  std::fwrite(line.data(), 1, line.size(), out_);
  std::fflush(out_);
}

}  // namespace kvbuffer::server
