// KServe v2's JSON tensors (the Open Inference Protocol's REST binding):
// an inference request's JSON into the ModelInferRequest the gRPC path
// takes (each input's data, flat or nested, packed into
// raw_input_contents), and a ModelInferResponse back into JSON. Bad input
// gets kInvalidArgument naming what is wrong: JSON that does not parse
// (invalid UTF-8 too), nesting deeper than kMaxJsonDepth, a field of the
// wrong type, an unknown datatype, data that does not fill the shape, a
// number outside its datatype's range. FP16 and BF16 travel only as
// binary data (Triton's binary tensor extension, not served yet), so
// they are refused in JSON either way.
//
//   ASSIGN_OR_RETURN(inference::ModelInferRequest req, InferRequestFromJson(body, "mlp", ""));
//   ASSIGN_OR_RETURN(std::string json, InferResponseToJson(resp));
#ifndef PIPESERVE_SERVER_COORDINATOR_KSERVE_JSON_H_
#define PIPESERVE_SERVER_COORDINATOR_KSERVE_JSON_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"
#include "proto/grpc_service.pb.h"

namespace pipeserve {

inline constexpr int kMaxJsonDepth = 32;

// `body` parsed: kInvalidArgument for nesting beyond kMaxJsonDepth, or
// JSON that does not parse (invalid UTF-8 included), with the parser's
// account of where.
absl::StatusOr<nlohmann::json> ParseJsonBody(absl::string_view body);

// The request for model `model` at `version` ("": any) that `body` asks for.
absl::StatusOr<inference::ModelInferRequest> InferRequestFromJson(absl::string_view body,
                                                                  const std::string& model,
                                                                  const std::string& version);

// `resp` as KServe v2 JSON: model_name, model_version, id, and each output's
// name, datatype, shape and data (flat, row-major).
absl::StatusOr<std::string> InferResponseToJson(const inference::ModelInferResponse& resp);

// Server and model metadata as KServe v2 JSON.
std::string ServerMetadataToJson(const inference::ServerMetadataResponse& m);
std::string ModelMetadataToJson(const inference::ModelMetadataResponse& m);

// {"error": message}
std::string ErrorJson(absl::string_view message);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_KSERVE_JSON_H_
