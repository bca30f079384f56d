#include "service/server/model_config_file.h"

#include <cstdint>
#include <fstream>
#include <map>
#include <sstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace kvbuffer::server {

namespace {

using Settings = std::vector<std::pair<std::string, std::string>>;  // in file order

absl::Status ParseError(absl::string_view origin, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(origin, ": ", what));
}

absl::StatusOr<Settings> ParseKeyValue(absl::string_view text, absl::string_view origin) {
  Settings out;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    if (size_t hash = line.find('#'); hash != absl::string_view::npos) line = line.substr(0, hash);
    line = absl::StripAsciiWhitespace(line);
    if (line.empty()) continue;
    const size_t eq = line.find('=');
    if (eq == absl::string_view::npos) {
      return ParseError(
          origin, absl::StrCat("line ", line_no, ": expected key = value, got \"", line, "\""));
    }
    out.emplace_back(std::string(absl::StripAsciiWhitespace(line.substr(0, eq))),
                     std::string(absl::StripAsciiWhitespace(line.substr(eq + 1))));
  }
  return out;
}

// A small JSON reader that keeps the scalar members of the top-level object and skips nested
// objects and arrays.
class JsonScanner {
 public:
  JsonScanner(absl::string_view text, absl::string_view origin) : s_(text), origin_(origin) {}

  absl::StatusOr<Settings> TopLevelScalars() {
    Settings out;
    SkipSpace();
    if (!Eat('{')) return Error("expected '{'");
    SkipSpace();
    if (Eat('}')) return out;
    for (;;) {
      SkipSpace();
      absl::StatusOr<std::string> key = String();
      if (!key.ok()) return key.status();
      SkipSpace();
      if (!Eat(':')) return Error("expected ':'");
      SkipSpace();
      if (Peek() == '{' || Peek() == '[') {
        if (absl::Status st = SkipNested(); !st.ok()) return st;
      } else {
        absl::StatusOr<std::string> value = Scalar();
        if (!value.ok()) return value.status();
        out.emplace_back(*key, *value);
      }
      SkipSpace();
      if (Eat(',')) continue;
      if (Eat('}')) break;
      return Error("expected ',' or '}'");
    }
    SkipSpace();
    if (pos_ != s_.size()) return Error("trailing characters after the object");
    return out;
  }

 private:
  char Peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }
  bool Eat(char c) {
    if (Peek() != c) return false;
    ++pos_;
    return true;
  }
  void SkipSpace() {
    while (pos_ < s_.size() && absl::ascii_isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
  }
  absl::Status Error(absl::string_view what) const {
    return ParseError(origin_, absl::StrCat("JSON at byte ", pos_, ": ", what));
  }
  absl::StatusOr<std::string> String() {
    if (!Eat('"')) return Error("expected a string");
    std::string out;
    while (pos_ < s_.size() && s_[pos_] != '"') {
      if (s_[pos_] == '\\' && pos_ + 1 < s_.size()) ++pos_;
      out.push_back(s_[pos_++]);
    }
    if (!Eat('"')) return Error("unterminated string");
    return out;
  }
  absl::StatusOr<std::string> Scalar() {
    if (Peek() == '"') return String();
    const size_t start = pos_;
    while (pos_ < s_.size() && s_[pos_] != ',' && s_[pos_] != '}' &&
           !absl::ascii_isspace(static_cast<unsigned char>(s_[pos_]))) {
      ++pos_;
    }
    if (pos_ == start) return Error("expected a value");
    return std::string(s_.substr(start, pos_ - start));
  }
  absl::Status SkipNested() {
    int depth = 0;
    while (pos_ < s_.size()) {
      const char c = s_[pos_];
      if (c == '"') {
        if (absl::StatusOr<std::string> str = String(); !str.ok()) return str.status();
        continue;
      }
      ++pos_;
      if (c == '{' || c == '[') ++depth;
      if (c == '}' || c == ']') {
        if (--depth == 0) return absl::OkStatus();
      }
    }
    return Error("unterminated object or array");
  }

  absl::string_view s_;
  absl::string_view origin_;
  size_t pos_ = 0;
};

absl::Status SetInt(const std::string& key, const std::string& value, absl::string_view origin,
                    int32_t* out) {
  if (!absl::SimpleAtoi(value, out)) {
    return ParseError(origin, absl::StrCat(key, " = \"", value, "\" is not an integer"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> Apply(const Settings& settings, bool ignore_unknown,
                                  absl::string_view origin) {
  ModelConfig c;
  c.name = "custom";
  // A preset, wherever it appears, is the base the other keys override.
  for (const auto& [key, value] : settings) {
    if (key == "preset" && !ModelPreset(value, &c)) {
      return ParseError(origin, absl::StrCat("unknown preset \"", value, "\", expected one of ",
                                             absl::StrJoin(ModelPresetNames(), ", ")));
    }
  }
  int32_t hidden_layers = -1;
  int32_t full_attention_interval = -1;
  bool layers_given = false;
  bool name_given = false;
  std::string model_type;
  const std::map<std::string, int32_t*> ints = {
      {"num_layers", &c.num_layers},
      {"num_k_heads", &c.num_k_heads},
      {"linear_num_key_heads", &c.num_k_heads},
      {"num_v_heads", &c.num_v_heads},
      {"linear_num_value_heads", &c.num_v_heads},
      {"head_k_dim", &c.head_k_dim},
      {"linear_key_head_dim", &c.head_k_dim},
      {"head_v_dim", &c.head_v_dim},
      {"linear_value_head_dim", &c.head_v_dim},
      {"conv_width", &c.conv_width},
      {"linear_conv_kernel_dim", &c.conv_width},
      {"num_hidden_layers", &hidden_layers},
      {"full_attention_interval", &full_attention_interval},
  };
  for (const auto& [key, value] : settings) {
    if (key == "preset") continue;
    if (key == "name") {
      c.name = value;
      name_given = true;
    } else if (key == "model_type") {
      model_type = value;
    } else if (key == "param_seed") {
      if (!absl::SimpleAtoi(value, &c.param_seed)) {
        return ParseError(
            origin, absl::StrCat("param_seed = \"", value, "\" is not an unsigned 64-bit integer"));
      }
    } else if (auto it = ints.find(key); it != ints.end()) {
      if (absl::Status s = SetInt(key, value, origin, it->second); !s.ok()) return s;
      if (key == "num_layers") layers_given = true;
    } else if (!ignore_unknown) {
      return ParseError(origin, absl::StrCat("unknown key \"", key, "\""));
    }
  }
  if (!layers_given && hidden_layers > 0) {
    c.num_layers = full_attention_interval > 0
                       ? hidden_layers - hidden_layers / full_attention_interval
                       : hidden_layers;
  }
  if (!name_given && !model_type.empty()) c.name = model_type;
  if (std::string m = ValidateModelConfig(c); !m.empty()) return ParseError(origin, m);
  return c;
}

}  // namespace

absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view text, absl::string_view origin) {
  absl::string_view trimmed = absl::StripLeadingAsciiWhitespace(text);
  if (!trimmed.empty() && trimmed.front() == '{') {
    absl::StatusOr<Settings> settings = JsonScanner(text, origin).TopLevelScalars();
    if (!settings.ok()) return settings.status();
    return Apply(*settings, /*ignore_unknown=*/true, origin);
  }
  absl::StatusOr<Settings> settings = ParseKeyValue(text, origin);
  if (!settings.ok()) return settings.status();
  return Apply(*settings, /*ignore_unknown=*/false, origin);
}

absl::StatusOr<ModelConfig> LoadModelConfigFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("--config: cannot read ", path));
  std::stringstream buffer;
  buffer << in.rdbuf();
  return ParseModelConfig(buffer.str(), path);
}

}  // namespace kvbuffer::server
