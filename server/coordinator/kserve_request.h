// KServe v2 inference requests and responses, checked against the plan of
// the deployment that will run them, without gRPC. Everything a request
// carries comes from outside: names, datatypes and shapes are checked, and
// a shape's byte size (with overflow checks) is compared with the bytes
// actually sent before anything is allocated.
//
//   ASSIGN_OR_RETURN(std::vector<Tensor> inputs, ParseInferInputs(req, deployment->plan()));
//   ASSIGN_OR_RETURN(std::vector<int> chosen, ChooseOutputs(req, deployment->plan()));
//   ... outputs = deployment->Infer(inputs, ...) ...
//   BuildInferResponse(req, deployment->plan(), chosen, outputs, &resp);
#ifndef PIPESERVE_SERVER_COORDINATOR_KSERVE_REQUEST_H_
#define PIPESERVE_SERVER_COORDINATOR_KSERVE_REQUEST_H_

#include <vector>

#include "absl/status/statusor.h"
#include "proto/grpc_service.pb.h"
#include "proto/model.pb.h"
#include "runtime/tensor.h"

namespace pipeserve {

// The version every model is served as.
inline constexpr char kModelVersion[] = "1";

// Tensors for the request's inputs, in the plan's input order.
// kInvalidArgument naming the input for an unknown, missing or repeated
// input, a datatype other than the model input's (FP32, FP16, BF16,
// INT64, INT32, BOOL), a shape that cannot exist, contents whose size does
// not match the shape (typed contents: fp32_contents, int64_contents,
// int_contents, bool_contents; FP16 and BF16 only raw), a BOOL byte other
// than 0 or 1, or raw and typed contents mixed.
absl::StatusOr<std::vector<Tensor>> ParseInferInputs(const inference::ModelInferRequest& req,
                                                     const Plan& plan);

// The plan outputs to return, by index: all in order when the request
// names none, else those named, in the request's order. kInvalidArgument
// for an unknown or repeated name.
absl::StatusOr<std::vector<int>> ChooseOutputs(const inference::ModelInferRequest& req,
                                               const Plan& plan);

// The response: model name and version, the request's id, and the chosen
// outputs as raw contents in their datatypes.
void BuildInferResponse(const inference::ModelInferRequest& req, const Plan& plan,
                        const std::vector<int>& chosen, const std::vector<Tensor>& outputs,
                        inference::ModelInferResponse* resp);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_KSERVE_REQUEST_H_
