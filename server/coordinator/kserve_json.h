// KServe v2's JSON tensors (the Open Inference Protocol's REST binding):
// an inference request's JSON into the ModelInferRequest the gRPC path
// takes (each input's data, flat or nested, packed into
// raw_input_contents), and a ModelInferResponse back into JSON. Bad input
// gets kInvalidArgument naming what is wrong: JSON that does not parse
// (invalid UTF-8 too), nesting deeper than kMaxJsonDepth, a field of the
// wrong type, an unknown datatype, data that does not fill the shape, a
// number outside its datatype's range.
//
// Triton's binary tensor data extension: the body's first
// `json_length` bytes (Inference-Header-Content-Length) are the JSON, and
// after them come the bytes of each input whose "parameters" say
// "binary_data_size", in input order; outputs come back the same way when
// the request's "binary_data_output" or an output's "binary_data" is
// true. FP16 and BF16 travel only so.
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

// The request for model `model` at `version` ("": any) that `body` asks
// for; `json_length` -1 when the body is all JSON. The binary output
// wishes travel in the request's parameters ("binary_data_output", and
// each output's "binary_data"), for InferResponseToJson.
absl::StatusOr<inference::ModelInferRequest> InferRequestFromJson(absl::string_view body,
                                                                  const std::string& model,
                                                                  const std::string& version,
                                                                  int64_t json_length = -1);

// A response body: JSON, then binary outputs' bytes (json_length -1: none).
struct RestBody {
  std::string body;
  int64_t json_length = -1;
};

// `resp` (to `req`) as KServe v2 JSON: model_name, model_version, id, and
// each output's name, datatype, shape and data (flat, row-major), or its
// "binary_data_size" with its bytes after the JSON.
absl::StatusOr<RestBody> InferResponseToJson(const inference::ModelInferResponse& resp,
                                             const inference::ModelInferRequest& req = {});

// Server and model metadata as KServe v2 JSON.
std::string ServerMetadataToJson(const inference::ServerMetadataResponse& m);
std::string ModelMetadataToJson(const inference::ModelMetadataResponse& m);

// The repository extension's index request body: its "ready" (false when
// the body is empty or leaves it out); kInvalidArgument for a body that
// is not a JSON object or a "ready" that is not true or false.
absl::StatusOr<bool> RepositoryIndexReadyFromJson(absl::string_view body);
// The index as Triton's REST answers it: [{"name", "version", "state", "reason"}].
std::string RepositoryIndexToJson(const inference::RepositoryIndexResponse& index);

// {"error": message}
std::string ErrorJson(absl::string_view message);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_KSERVE_JSON_H_
