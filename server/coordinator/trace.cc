#include "server/coordinator/trace.h"

#include <algorithm>
#include <limits>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"

namespace pipeserve {
namespace {

// JSON string contents (names are model names, addresses and fixed words,
// but nothing is assumed).
std::string Quote(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      absl::StrAppend(&out, "\\u00", absl::Hex(static_cast<unsigned char>(c), absl::kZeroPad2));
    } else {
      out += c;
    }
  }
  return out + "\"";
}

// The track of a span within its process.
int Track(const std::string& what) {
  if (what == "compute" || what == "request") return 1;
  if (what == "queue" || what == "send") return 2;
  return 3;  // transfer, receive
}

}  // namespace

std::string TraceToChromeJson(const std::vector<TraceSpan>& spans, const ModelInfo& model) {
  const int stages = std::max(1, model.plan->stages_size());
  int64_t origin = std::numeric_limits<int64_t>::max();
  for (const TraceSpan& s : spans) origin = std::min(origin, s.start_us());
  if (spans.empty()) origin = 0;
  // pid 1: the coordinator; 2 + replica * stages + stage: a stage replica.
  auto pid = [&](const TraceSpan& s) {
    return s.stage() < 0 ? 1 : 2 + s.replica() * stages + s.stage();
  };
  std::map<int, std::pair<std::string, bool>> processes;  // pid -> (name, coordinator)
  std::vector<std::string> events;
  for (const TraceSpan& s : spans) {
    const int p = pid(s);
    if (!processes.count(p)) {
      std::string name = "coordinator";
      if (s.stage() >= 0) {
        const size_t at = static_cast<size_t>(s.replica() * stages + s.stage());
        name = absl::StrCat("stage ", s.stage(),
                            model.replicas > 1 ? absl::StrCat(" replica ", s.replica()) : "",
                            at < model.servers.size() ? absl::StrCat(" @ ", model.servers[at])
                                                      : "");
      }
      processes[p] = {name, s.stage() < 0};
    }
    std::string args = s.microbatch() >= 0 ? absl::StrCat("{\"microbatch\":", s.microbatch(), "}")
                                           : "{}";
    std::string name = s.microbatch() >= 0 ? absl::StrCat(s.what(), " ", s.microbatch())
                                           : s.what();
    events.push_back(absl::StrCat("{\"name\":", Quote(name), ",\"cat\":", Quote(s.what()),
                                  ",\"ph\":\"X\",\"ts\":", s.start_us() - origin,
                                  ",\"dur\":", s.duration_us(), ",\"pid\":", p,
                                  ",\"tid\":", Track(s.what()), ",\"args\":", args, "}"));
  }
  for (const auto& [p, named] : processes) {
    const auto& [name, coordinator] = named;
    events.push_back(absl::StrCat("{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":", p,
                                  ",\"args\":{\"name\":", Quote(name), "}}"));
    events.push_back(absl::StrCat("{\"name\":\"process_sort_index\",\"ph\":\"M\",\"pid\":", p,
                                  ",\"args\":{\"sort_index\":", p, "}}"));
    const char* tracks[] = {coordinator ? "request" : "compute", coordinator ? "send" : "queue",
                            coordinator ? "receive" : "transfer in"};
    for (int t = 1; t <= 3; ++t) {
      events.push_back(absl::StrCat("{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":", p,
                                    ",\"tid\":", t, ",\"args\":{\"name\":\"", tracks[t - 1],
                                    "\"}}"));
    }
  }
  std::string out = absl::StrCat("{\"displayTimeUnit\":\"ms\",\"otherData\":{\"model\":",
                                 Quote(model.name), ",\"version\":", model.version,
                                 ",\"microbatches\":", model.microbatches,
                                 "},\"traceEvents\":[\n");
  for (size_t i = 0; i < events.size(); ++i) {
    absl::StrAppend(&out, events[i], i + 1 < events.size() ? ",\n" : "\n");
  }
  return out + "]}\n";
}

}  // namespace pipeserve
