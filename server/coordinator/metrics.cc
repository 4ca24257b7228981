#include "server/coordinator/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace pipeserve {
namespace {

// Label values are quoted; escape what the format requires.
std::string Escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '\\' || c == '"') out.push_back('\\');
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out.push_back(c);
  }
  return out;
}

}  // namespace

const std::vector<double>& Metrics::Buckets() {
  static const auto* b = new std::vector<double>{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                 0.1,   0.25,   0.5,   1,    2.5,   5, 10};
  return *b;
}

void Metrics::RecordInference(const std::string& model, const absl::Status& status,
                              absl::Duration latency) {
  double s = absl::ToDoubleSeconds(latency);
  absl::MutexLock lock(&mu_);
  ++requests_[{model, absl::StatusCodeToString(status.code())}];
  Histogram& h = latency_[model];
  if (h.counts.empty()) h.counts.assign(Buckets().size(), 0);
  for (size_t i = 0; i < Buckets().size(); ++i) {
    if (s <= Buckets()[i]) {
      ++h.counts[i];
      break;
    }
  }
  h.sum += s;
  ++h.count;
}

void Metrics::RecordUnknownModelInference(const absl::Status& status, absl::Duration latency) {
  RecordInference(kUnknownModelLabel, status, latency);
}

std::string Metrics::Render(const std::vector<ModelInfo>& models) const {
  std::string out;
  absl::StrAppend(&out,
                  "# HELP pipeserve_inference_requests_total Inference requests by model and "
                  "final gRPC status code.\n"
                  "# TYPE pipeserve_inference_requests_total counter\n");
  absl::MutexLock lock(&mu_);
  for (const auto& [key, n] : requests_) {
    absl::StrAppend(&out, "pipeserve_inference_requests_total{model=\"", Escape(key.first),
                    "\",code=\"", key.second, "\"} ", n, "\n");
  }
  absl::StrAppend(&out,
                  "# HELP pipeserve_inference_duration_seconds Inference request latency.\n"
                  "# TYPE pipeserve_inference_duration_seconds histogram\n");
  for (const auto& [model, h] : latency_) {
    uint64_t cumulative = 0;
    std::string m = Escape(model);
    for (size_t i = 0; i < Buckets().size(); ++i) {
      cumulative += h.counts[i];
      absl::StrAppend(&out, "pipeserve_inference_duration_seconds_bucket{model=\"", m,
                      "\",le=\"", Buckets()[i], "\"} ", cumulative, "\n");
    }
    absl::StrAppend(&out, "pipeserve_inference_duration_seconds_bucket{model=\"", m,
                    "\",le=\"+Inf\"} ", h.count, "\n");
    absl::StrAppend(&out, "pipeserve_inference_duration_seconds_sum{model=\"", m, "\"} ",
                    absl::StrFormat("%.6f", h.sum), "\n");
    absl::StrAppend(&out, "pipeserve_inference_duration_seconds_count{model=\"", m, "\"} ",
                    h.count, "\n");
  }
  absl::StrAppend(&out,
                  "# HELP pipeserve_model_ready 1 if the model is READY, else 0.\n"
                  "# TYPE pipeserve_model_ready gauge\n");
  for (const ModelInfo& info : models) {
    absl::StrAppend(&out, "pipeserve_model_ready{model=\"", Escape(info.name), "\"} ",
                    info.state == ModelState::kReady ? 1 : 0, "\n");
  }
  absl::StrAppend(&out,
                  "# HELP pipeserve_model_stages Pipeline stages of each model.\n"
                  "# TYPE pipeserve_model_stages gauge\n");
  for (const ModelInfo& info : models) {
    absl::StrAppend(&out, "pipeserve_model_stages{model=\"", Escape(info.name), "\"} ",
                    info.plan->stages_size(), "\n");
  }
  absl::StrAppend(&out,
                  "# HELP pipeserve_model_replicas Replicas of every stage of each model.\n"
                  "# TYPE pipeserve_model_replicas gauge\n");
  for (const ModelInfo& info : models) {
    absl::StrAppend(&out, "pipeserve_model_replicas{model=\"", Escape(info.name), "\"} ",
                    info.replicas, "\n");
  }
  absl::StrAppend(&out,
                  "# HELP pipeserve_model_ready_replicas Replicas serving now (fewer while one "
                  "is reloaded after a failure).\n"
                  "# TYPE pipeserve_model_ready_replicas gauge\n");
  for (const ModelInfo& info : models) {
    absl::StrAppend(&out, "pipeserve_model_ready_replicas{model=\"", Escape(info.name), "\"} ",
                    info.ready_replicas, "\n");
  }
  return out;
}

MetricsHttpServer::MetricsHttpServer(const Metrics* metrics,
                                     std::function<std::vector<ModelInfo>()> models)
    : metrics_(metrics), models_(std::move(models)) {}

MetricsHttpServer::~MetricsHttpServer() {
  stopping_ = true;
  if (thread_.joinable()) thread_.join();
  if (listener_ >= 0) ::close(listener_);
}

absl::Status MetricsHttpServer::Start(const std::string& host, int port) {
  listener_ = ::socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  ::setsockopt(listener_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  if (::inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) {
    return absl::InvalidArgumentError(absl::StrCat("metrics: bad IPv4 address \"", host, "\""));
  }
  if (::bind(listener_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::listen(listener_, 16) != 0) {
    return absl::UnavailableError(
        absl::StrCat("metrics: cannot listen on ", host, ":", port, ": ", std::strerror(errno)));
  }
  socklen_t len = sizeof addr;
  ::getsockname(listener_, reinterpret_cast<sockaddr*>(&addr), &len);
  port_ = ntohs(addr.sin_port);
  thread_ = std::thread([this] { Serve(); });
  return absl::OkStatus();
}

void MetricsHttpServer::Serve() {
  while (!stopping_) {
    pollfd p{listener_, POLLIN, 0};
    if (::poll(&p, 1, 200) <= 0) continue;  // wakes to check stopping_
    int c = ::accept(listener_, nullptr, nullptr);
    if (c < 0) continue;
    // Read the request head (small; a scrape sends a few hundred bytes).
    std::string req;
    char buf[2048];
    while (req.find("\r\n\r\n") == std::string::npos && req.size() < 16384) {
      pollfd q{c, POLLIN, 0};
      if (::poll(&q, 1, 2000) <= 0) break;
      ssize_t n = ::read(c, buf, sizeof buf);
      if (n <= 0) break;
      req.append(buf, n);
    }
    std::string body, status = "200 OK", type = "text/plain; version=0.0.4; charset=utf-8";
    if (req.rfind("GET /metrics ", 0) == 0 || req.rfind("GET /metrics?", 0) == 0) {
      body = metrics_->Render(models_());
    } else {
      status = "404 Not Found";
      body = "pipeserve serves GET /metrics here\n";
    }
    std::string resp = absl::StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", type,
                                    "\r\nContent-Length: ", body.size(),
                                    "\r\nConnection: close\r\n\r\n", body);
    size_t off = 0;
    while (off < resp.size()) {
      ssize_t n = ::write(c, resp.data() + off, resp.size() - off);
      if (n <= 0) break;
      off += n;
    }
    ::close(c);
  }
}

}  // namespace pipeserve
