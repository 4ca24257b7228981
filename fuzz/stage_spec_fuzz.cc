// Fuzz target: LoadStage requests as they reach a stage server: a
// StageSpec (checked field by field, its graph validated) and, when it
// passes, weight chunks for it (the rest of the input, cut into chunks).
#include <cstdint>

#include "proto/pipeserve_service.pb.h"
#include "server/stage/stage_server_core.h"

namespace {

class NoDialer : public pipeserve::Dialer {
 public:
  std::shared_ptr<pipeserve::FrameSink> Dial(const std::string&,
                                             const pipeserve::StageKey&) override {
    return nullptr;
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  // The first two bytes: how long the spec is (the rest are chunks).
  size_t spec_len = std::min<size_t>(size - 2, (size_t{data[0]} << 8) | data[1]);
  pipeserve::LoadStageRequest first;
  if (!first.ParseFromArray(data + 2, static_cast<int>(spec_len)) || !first.has_spec()) return 0;
  static NoDialer* dialer = new NoDialer();
  pipeserve::StageServerOptions options;
  options.max_stage_bytes = 1 << 20;  // keep allocations small
  pipeserve::StageServerCore core(options, dialer);
  auto load = core.BeginLoad(first.spec());
  if (!load.ok()) return 0;
  pipeserve::LoadStageRequest chunk;
  if (chunk.ParseFromArray(data + 2 + spec_len, static_cast<int>(size - 2 - spec_len)) &&
      chunk.has_chunk()) {
    (*load)->AddChunk(chunk.chunk()).IgnoreError();
  }
  return 0;
}
