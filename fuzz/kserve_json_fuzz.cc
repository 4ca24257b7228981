// Fuzz target: KServe v2 REST inference requests as JSON bodies
// (server/coordinator/kserve_json.h): parsing, depth, datatypes, shapes
// and the data that fills them. Whatever is accepted has one raw content
// per input, exactly the bytes its datatype and shape need.
#include <cstdint>
#include <string>

#include "graph/dtype.h"
#include "server/coordinator/kserve_json.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string body(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<inference::ModelInferRequest> req = pipeserve::InferRequestFromJson(body, "m", "");
  if (!req.ok()) {
    if (req.status().code() != absl::StatusCode::kInvalidArgument) __builtin_trap();
    return 0;
  }
  if (req->inputs_size() != req->raw_input_contents_size()) __builtin_trap();
  for (int i = 0; i < req->inputs_size(); ++i) {
    const auto& in = req->inputs(i);
    absl::StatusOr<pipeserve::DataType> dt = pipeserve::ParseKServeName(in.datatype());
    if (!dt.ok()) __builtin_trap();
    uint64_t n = 1;
    for (int64_t d : in.shape()) n *= static_cast<uint64_t>(d);
    if (req->raw_input_contents(i).size() != n * pipeserve::ElementSize(*dt)) __builtin_trap();
  }
  return 0;
}
