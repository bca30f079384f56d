#include "service/server/metrics/metrics.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace kvbuffer::metrics {
namespace {

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "kvb_metrics: %s\n", what.c_str());
  std::abort();
}

std::string EscapeHelp(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

const char* TypeName(MetricType t) {
  switch (t) {
    case MetricType::kCounter: return "counter";
    case MetricType::kGauge: return "gauge";
    case MetricType::kHistogram: return "histogram";
  }
  return "untyped";
}

}  // namespace

void Counter::SetMonotonic(double v) {
  double cur = value_.load(std::memory_order_relaxed);
  while (v > cur && !value_.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
  }
}

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)) {
  std::sort(bounds_.begin(), bounds_.end());
  bounds_.erase(std::unique(bounds_.begin(), bounds_.end()), bounds_.end());
  while (!bounds_.empty() && std::isinf(bounds_.back())) bounds_.pop_back();
  buckets_ = std::make_unique<std::atomic<uint64_t>[]>(bounds_.size() + 1);
  for (size_t i = 0; i <= bounds_.size(); ++i) buckets_[i].store(0, std::memory_order_relaxed);
}

void Histogram::Observe(double v) {
  // Bucket i counts bounds_[i-1] < v <= bounds_[i] (the "le" semantics).
  const size_t i = static_cast<size_t>(
      std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin());
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(v, std::memory_order_relaxed);
}

Histogram::Snapshot Histogram::Collect() const {
  Snapshot s;
  s.bounds = bounds_;
  s.cumulative.resize(bounds_.size() + 1);
  uint64_t acc = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    acc += buckets_[i].load(std::memory_order_relaxed);
    s.cumulative[i] = acc;
  }
  s.count = acc;  // consistent with the buckets by construction
  s.sum = sum_.load(std::memory_order_relaxed);
  return s;
}

std::vector<double> ExponentialBuckets(double start, double factor, int count) {
  std::vector<double> b;
  double v = start;
  for (int i = 0; i < count; ++i, v *= factor) b.push_back(v);
  return b;
}

std::vector<double> DefaultLatencyBuckets() {
  return {0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
          0.025,   0.05,   0.1,     0.25,   0.5,   1,      2.5,   5,     10};
}

std::string FormatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  if (v == std::floor(v) && std::fabs(v) < 9007199254740992.0) {
    auto r = std::to_chars(buf, buf + sizeof buf, static_cast<long long>(v));
    return std::string(buf, r.ptr);
  }
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

std::string EscapeLabelValue(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

bool ValidMetricName(std::string_view name) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
    if (!(alpha || (i > 0 && c >= '0' && c <= '9'))) return false;
  }
  return true;
}

bool ValidLabelName(std::string_view name) {
  if (name.empty() || name.substr(0, 2) == "__") return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    if (!(alpha || (i > 0 && c >= '0' && c <= '9'))) return false;
  }
  return true;
}

FamilyBase::FamilyBase(std::string name, std::string help, std::vector<std::string> label_names,
                       MetricType type)
    : name_(std::move(name)), help_(std::move(help)), label_names_(std::move(label_names)),
      type_(type) {
  if (!ValidMetricName(name_)) Fail("invalid metric name '" + name_ + "'");
  for (const auto& l : label_names_) {
    if (!ValidLabelName(l) || (type_ == MetricType::kHistogram && l == "le")) {
      Fail("invalid label name '" + l + "' on " + name_);
    }
  }
}

void FamilyBase::Render(std::string* out) const {
  *out += "# HELP " + name_ + " " + EscapeHelp(help_) + "\n";
  *out += "# TYPE " + name_ + " " + TypeName(type_) + "\n";
  RenderChildren(out);
}

std::string FamilyBase::LabelText(const std::vector<std::string>& values,
                                  std::string_view extra_name,
                                  std::string_view extra_value) const {
  if (label_names_.empty() && extra_name.empty()) return "";
  std::string s = "{";
  for (size_t i = 0; i < label_names_.size(); ++i) {
    if (i) s += ',';
    s += label_names_[i];
    s += "=\"";
    s += EscapeLabelValue(i < values.size() ? values[i] : std::string());
    s += '"';
  }
  if (!extra_name.empty()) {
    if (!label_names_.empty()) s += ',';
    s += extra_name;
    s += "=\"";
    s += EscapeLabelValue(extra_value);
    s += '"';
  }
  s += '}';
  return s;
}

template <>
void Family<Counter>::RenderChildren(std::string* out) const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  for (const auto& [values, c] : children_) {
    *out += name_ + LabelText(values) + " " + FormatValue(c->Value()) + "\n";
  }
}

template <>
void Family<Gauge>::RenderChildren(std::string* out) const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  for (const auto& [values, g] : children_) {
    *out += name_ + LabelText(values) + " " + FormatValue(g->Value()) + "\n";
  }
}

template <>
void Family<Histogram>::RenderChildren(std::string* out) const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  for (const auto& [values, h] : children_) {
    const Histogram::Snapshot s = h->Collect();
    for (size_t i = 0; i <= s.bounds.size(); ++i) {
      const std::string le = i < s.bounds.size() ? FormatValue(s.bounds[i]) : "+Inf";
      *out += name_ + "_bucket" + LabelText(values, "le", le) + " " +
              FormatValue(static_cast<double>(s.cumulative[i])) + "\n";
    }
    const std::string labels = LabelText(values);
    *out += name_ + "_sum" + labels + " " + FormatValue(s.sum) + "\n";
    *out += name_ + "_count" + labels + " " + FormatValue(static_cast<double>(s.count)) + "\n";
  }
}

void Registry::Add(std::unique_ptr<FamilyBase> family) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& f : families_) {
    if (f->name() == family->name()) Fail("duplicate metric '" + family->name() + "'");
  }
  families_.push_back(std::move(family));
}

Family<Counter>& Registry::AddCounter(const std::string& name, const std::string& help,
                                      std::vector<std::string> labels) {
  auto f = std::make_unique<Family<Counter>>(name, help, std::move(labels), MetricType::kCounter,
                                             [] { return std::make_unique<Counter>(); });
  auto* p = f.get();
  Add(std::move(f));
  return *p;
}

Family<Gauge>& Registry::AddGauge(const std::string& name, const std::string& help,
                                  std::vector<std::string> labels) {
  auto f = std::make_unique<Family<Gauge>>(name, help, std::move(labels), MetricType::kGauge,
                                           [] { return std::make_unique<Gauge>(); });
  auto* p = f.get();
  Add(std::move(f));
  return *p;
}

Family<Histogram>& Registry::AddHistogram(const std::string& name, const std::string& help,
                                          std::vector<std::string> labels,
                                          std::vector<double> bounds) {
  auto f = std::make_unique<Family<Histogram>>(
      name, help, std::move(labels), MetricType::kHistogram,
      [bounds] { return std::make_unique<Histogram>(bounds); });
  auto* p = f.get();
  Add(std::move(f));
  return *p;
}

void Registry::AddCollectHook(std::function<void()> hook) {
  std::lock_guard<std::mutex> lock(mu_);
  hooks_.push_back(std::move(hook));
}

std::string Registry::Render() {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& h : hooks_) h();
  std::string out;
  out.reserve(4096);
  for (const auto& f : families_) f->Render(&out);
  return out;
}

}  // namespace kvbuffer::metrics
