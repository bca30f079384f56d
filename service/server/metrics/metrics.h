// A small Prometheus client: counters, gauges and histograms with labels, rendered in the text
// exposition format 0.0.4. prometheus-cpp is not packaged in Debian 12; this covers what the server
// needs. Thread-safe: updates are lock-free atomics (cache the child pointer returned by
// Family::Labels on the hot path); looking a child up takes a shared lock, creating one a unique
// lock; Render takes the registry lock and each family's shared lock.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <vector>

namespace kvbuffer::metrics {

// A monotonically increasing value.
class Counter {
 public:
  // Adds `v` (ignored unless v >= 0).
  void Inc(double v = 1.0) {
    if (v >= 0) value_.fetch_add(v, std::memory_order_relaxed);
  }
  // Raises the value to `v` if it is larger (for totals kept elsewhere, e.g. engine counters).
  void SetMonotonic(double v);
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

// A value that goes up and down.
class Gauge {
 public:
  void Set(double v) { value_.store(v, std::memory_order_relaxed); }
  void Inc(double v = 1.0) { value_.fetch_add(v, std::memory_order_relaxed); }
  void Dec(double v = 1.0) { value_.fetch_sub(v, std::memory_order_relaxed); }
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

// Observations counted into fixed buckets (upper bounds, ascending; +Inf is implicit).
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void Observe(double v);

  struct Snapshot {
    std::vector<double> bounds;        // without +Inf
    std::vector<uint64_t> cumulative;  // one per bound, then +Inf (== count)
    double sum = 0;
    uint64_t count = 0;
  };
  Snapshot Collect() const;

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // bounds_.size() + 1, not cumulative
  std::atomic<double> sum_{0.0};
};

// Buckets start, start*factor, ... (count of them).
std::vector<double> ExponentialBuckets(double start, double factor, int count);

// Latency buckets for request durations: 50 us .. 10 s (1-2.5-5 steps).
std::vector<double> DefaultLatencyBuckets();

enum class MetricType { kCounter, kGauge, kHistogram };

class FamilyBase {
 public:
  FamilyBase(std::string name, std::string help, std::vector<std::string> label_names,
             MetricType type);
  virtual ~FamilyBase() = default;
  FamilyBase(const FamilyBase&) = delete;
  FamilyBase& operator=(const FamilyBase&) = delete;

  const std::string& name() const { return name_; }
  const std::vector<std::string>& label_names() const { return label_names_; }
  MetricType type() const { return type_; }

  // Appends "# HELP", "# TYPE" and every child's samples to `out`.
  void Render(std::string* out) const;

 protected:
  virtual void RenderChildren(std::string* out) const = 0;
  // Renders `{k="v",...}` for the family's labels with `values`, plus an optional extra label.
  std::string LabelText(const std::vector<std::string>& values, std::string_view extra_name = {},
                        std::string_view extra_value = {}) const;

  std::string name_;
  std::string help_;
  std::vector<std::string> label_names_;
  MetricType type_;
};

// Children of one metric, one per distinct label-value tuple. References returned by Labels stay
// valid for the family's lifetime.
template <typename T>
class Family : public FamilyBase {
 public:
  Family(std::string name, std::string help, std::vector<std::string> label_names, MetricType type,
         std::function<std::unique_ptr<T>()> make)
      : FamilyBase(std::move(name), std::move(help), std::move(label_names), type),
        make_(std::move(make)) {
    if (label_names_.empty()) Labels({});  // an unlabelled metric is always exported
  }

  // The child for these label values (as many as label names; missing ones read as "").
  T& Labels(std::vector<std::string> values) {
    values.resize(label_names_.size());
    {
      std::shared_lock<std::shared_mutex> lock(mu_);
      auto it = children_.find(values);
      if (it != children_.end()) return *it->second;
    }
    std::unique_lock<std::shared_mutex> lock(mu_);
    auto& slot = children_[std::move(values)];
    if (!slot) slot = make_();
    return *slot;
  }

  // The unlabelled child.
  T& Get() { return Labels({}); }

 protected:
  void RenderChildren(std::string* out) const override;

 private:
  std::function<std::unique_ptr<T>()> make_;
  mutable std::shared_mutex mu_;
  std::map<std::vector<std::string>, std::unique_ptr<T>> children_;
};

// Owns families and renders them in registration order.
class Registry {
 public:
  Registry() = default;
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // Names follow Prometheus rules ([a-zA-Z_:][a-zA-Z0-9_:]*; labels [a-zA-Z_][a-zA-Z0-9_]*, no
  // "__" prefix, no "le" on histograms); a bad or duplicate name aborts (a programming error).
  Family<Counter>& AddCounter(const std::string& name, const std::string& help,
                              std::vector<std::string> labels = {});
  Family<Gauge>& AddGauge(const std::string& name, const std::string& help,
                          std::vector<std::string> labels = {});
  Family<Histogram>& AddHistogram(const std::string& name, const std::string& help,
                                  std::vector<std::string> labels, std::vector<double> bounds);

  // Runs before every Render (e.g. to refresh gauges from the engine's pools).
  void AddCollectHook(std::function<void()> hook);

  // Every family in the text exposition format 0.0.4.
  std::string Render();

 private:
  void Add(std::unique_ptr<FamilyBase> family);

  std::mutex mu_;
  std::vector<std::unique_ptr<FamilyBase>> families_;
  std::vector<std::function<void()>> hooks_;
};

// Content-Type of Render's output.
inline constexpr std::string_view kTextContentType = "text/plain; version=0.0.4; charset=utf-8";

// Formats a sample value: integers exactly, others shortest round-trip, +Inf/-Inf/NaN.
std::string FormatValue(double v);

// Escapes a label value (\\, \", \n).
std::string EscapeLabelValue(std::string_view v);

// True if `name` is a valid metric name / label name.
bool ValidMetricName(std::string_view name);
bool ValidLabelName(std::string_view name);

}  // namespace kvbuffer::metrics

namespace kvbuffer::metrics {
template <>
void Family<Counter>::RenderChildren(std::string* out) const;
template <>
void Family<Gauge>::RenderChildren(std::string* out) const;
template <>
void Family<Histogram>::RenderChildren(std::string* out) const;
}  // namespace kvbuffer::metrics
