#include "server/stage/stage_spec.h"

#include <set>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/model_name.h"
#include "common/status_macros.h"
#include "graph/validate.h"
#include "partitioner/routing.h"

namespace pipeserve {
namespace {

constexpr int kMaxStagesPerModel = 4096;
constexpr int kMaxThreads = 1024;
constexpr int kMaxReplicas = 64;

template <typename... Args>
absl::Status Invalid(const Args&... parts) {
  return absl::InvalidArgumentError(absl::StrCat("LoadStage: ", parts...));
}

// host:port with a DNS name, IPv4 address or [IPv6] address and a port in
// 1..65535: nothing gRPC would read as another scheme (unix:, ipv4:, ...).
absl::Status CheckAddress(const std::string& address) {
  size_t colon = address.rfind(':');
  if (address.size() > 255 || colon == std::string::npos || colon == 0) {
    return Invalid("next_address \"", absl::CHexEscape(address.substr(0, 64)),
                   "\" is not host:port");
  }
  std::string host = address.substr(0, colon);
  int port = 0;
  if (!absl::SimpleAtoi(address.substr(colon + 1), &port) || port < 1 || port > 65535) {
    return Invalid("next_address \"", absl::CHexEscape(address.substr(0, 64)),
                   "\" has no port in 1..65535");
  }
  bool bracketed = host.size() > 2 && host.front() == '[' && host.back() == ']';
  for (char c : bracketed ? host.substr(1, host.size() - 2) : host) {
    bool ok = absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' ||
              (bracketed && c == ':');
    if (!ok) {
      return Invalid("next_address \"", absl::CHexEscape(address.substr(0, 64)),
                     "\" has a character a host name cannot have");
    }
  }
  return absl::OkStatus();
}

}  // namespace

namespace {

// The stage's place: its key, its place in the pipeline and the next hop.
absl::Status CheckPlace(const StageSpec& spec) {
  const StageKey& key = spec.key();
  absl::Status name = ValidModelName(key.model());
  if (!name.ok()) return Invalid("key: ", name.message());
  if (spec.num_stages() < 1 || spec.num_stages() > kMaxStagesPerModel) {
    return Invalid("num_stages ", spec.num_stages(), " is not in 1..", kMaxStagesPerModel);
  }
  if (key.stage() < 0 || key.stage() >= spec.num_stages()) {
    return Invalid("stage ", key.stage(), " is not in 0..", spec.num_stages() - 1);
  }
  if (key.replica() < 0 || key.replica() >= kMaxReplicas) {
    return Invalid("replica ", key.replica(), " is not in 0..", kMaxReplicas - 1);
  }
  if (spec.stage().index() != key.stage()) {
    return Invalid("the stage graph is stage ", spec.stage().index(), ", the key says ",
                   key.stage());
  }
  const bool last = key.stage() == spec.num_stages() - 1;
  if (last != spec.next_address().empty()) {
    return Invalid(last ? "the last stage has a next_address"
                        : "a stage before the last has no next_address");
  }
  if (!last) RETURN_IF_ERROR(CheckAddress(spec.next_address()));
  return absl::OkStatus();
}

// The weights, in total, against this server's limit (0: none).
absl::Status CheckWeightBytes(const Graph& graph, uint64_t max_weight_bytes) {
  uint64_t total = 0;
  for (const TensorInfo& p : graph.params()) {
    total += p.byte_size();  // each checked against its shape by ValidateGraph
    if (max_weight_bytes > 0 && total > max_weight_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "LoadStage: the stage's weights exceed this server's limit of ", max_weight_bytes,
          " bytes"));
    }
  }
  return absl::OkStatus();
}

// One value the stage receives: named, with a shape of checked size.
absl::Status CheckReceived(const ValueSpec& v, std::set<std::string>* received) {
  if (v.name().empty() || !received->insert(v.name()).second) {
    return Invalid("received value \"", v.name(), "\" is unnamed or listed twice");
  }
  if (v.shape_size() > kMaxRank) {
    return Invalid("received value \"", v.name(), "\" has ", v.shape_size(), " dimensions");
  }
  for (int d = 0; d < v.shape_size(); ++d) {
    if (v.shape(d) < -1) {
      return Invalid("received value \"", v.name(), "\": dimension ", v.shape(d),
                     " (-1 is a free dimension)");
    }
  }
  Shape fixed(v.shape().begin(), v.shape().end());
  for (int64_t& d : fixed) {
    if (d == -1) d = 1;
  }
  absl::Status size = CheckedByteSize(fixed, 8).status();
  if (!size.ok()) return Invalid("received value \"", v.name(), "\": ", size.message());
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateStageSpec(const StageSpec& spec, uint64_t max_weight_bytes) {
  RETURN_IF_ERROR(CheckPlace(spec));
  if (spec.threads() < 0 || spec.threads() > kMaxThreads) {
    return Invalid("threads ", spec.threads(), " is not in 0..", kMaxThreads);
  }
  if (spec.merge_rows() < 0) {
    return Invalid("merge_rows ", spec.merge_rows(), " is negative (0: no joining)");
  }
  // The graph: ops, arity, shapes, and each parameter's size against its
  // shape, all with checked arithmetic.
  absl::StatusOr<ValueShapes> shapes = ValidateGraph(spec.stage().graph());
  if (!shapes.ok()) return Invalid("stage graph: ", shapes.status().message());
  RETURN_IF_ERROR(CheckWeightBytes(spec.stage().graph(), max_weight_bytes));
  std::set<std::string> received;
  for (const ValueSpec& v : spec.receives()) RETURN_IF_ERROR(CheckReceived(v, &received));
  for (const ValueSpec& in : spec.stage().graph().inputs()) {
    if (!received.count(in.name())) {
      return Invalid("the stage reads \"", in.name(), "\" but does not receive it");
    }
  }
  for (const std::string& f : spec.forward()) {
    if (f.empty()) return Invalid("an empty name in forward");
  }
  return absl::OkStatus();
}


std::vector<StageSpec> MakeStageSpecs(const Plan& plan, const std::string& model,
                                      uint64_t deployment, const std::vector<std::string>& servers,
                                      int threads, int replica, int64_t merge_rows) {
  const Routing routing = RoutePlan(plan);
  // Every value that crosses a hop is a model input, some later stage's
  // input, or a model output: each is described there.
  absl::flat_hash_map<std::string, ValueSpec> specs;
  for (const ValueSpec& v : plan.inputs()) specs[v.name()] = v;
  for (const Stage& s : plan.stages()) {
    for (const ValueSpec& v : s.graph().inputs()) specs.emplace(v.name(), v);
  }
  for (const ValueSpec& v : plan.outputs()) specs.emplace(v.name(), v);

  const int n = plan.stages_size();
  std::vector<StageSpec> out(n);
  for (int i = 0; i < n; ++i) {
    StageSpec& spec = out[i];
    spec.mutable_key()->set_model(model);
    spec.mutable_key()->set_deployment(deployment);
    spec.mutable_key()->set_stage(i);
    spec.mutable_key()->set_replica(replica);
    *spec.mutable_stage() = plan.stages(i);
    spec.set_num_stages(n);
    const std::vector<std::string>& incoming = i == 0 ? routing.to_first : routing.forward[i - 1];
    for (const std::string& name : incoming) {
      auto it = specs.find(name);
      ValueSpec* v = spec.add_receives();
      if (it != specs.end()) *v = it->second;
      v->set_name(name);
    }
    for (const std::string& f : routing.forward[i]) spec.add_forward(f);
    // Rows join only where everything received and sent on follows the
    // batch; a value no spec describes does not.
    bool batched = spec.receives_size() > 0;
    for (const ValueSpec& v : spec.receives()) batched = batched && v.batched();
    for (const std::string& f : routing.forward[i]) {
      auto it = specs.find(f);
      batched = batched && it != specs.end() && it->second.batched();
    }
    if (batched) spec.set_merge_rows(merge_rows);
    if (i + 1 < n && i + 1 < static_cast<int>(servers.size())) {
      spec.set_next_address(servers[i + 1]);
    }
    spec.set_threads(threads);
    spec.set_fingerprint(StageFingerprint(spec));
  }
  return out;
}

uint64_t StageFingerprint(const StageSpec& spec) {
  StageSpec bare = spec;
  bare.mutable_key()->clear_deployment();
  bare.clear_fingerprint();
  std::string bytes;
  bare.SerializeToString(&bytes);
  uint64_t h = 14695981039346656037ull;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace pipeserve
