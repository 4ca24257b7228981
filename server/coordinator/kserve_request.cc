#include "server/coordinator/kserve_request.h"

#include <cstring>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "graph/dtype.h"

namespace pipeserve {
namespace {

template <typename... Args>
absl::Status Invalid(const Args&... parts) {
  return absl::InvalidArgumentError(absl::StrCat(parts...));
}

// Names from a request are quoted, but never at length.
std::string Quoted(const std::string& name) {
  return absl::StrCat("\"", name.substr(0, 128), name.size() > 128 ? "...\"" : "\"");
}

std::string InputNames(const Plan& plan) {
  std::vector<std::string> names;
  for (const ValueSpec& v : plan.inputs()) names.push_back(v.name());
  return absl::StrJoin(names, ", ");
}

using InputTensor = inference::ModelInferRequest::InferInputTensor;

// Input `in`'s datatype, checked to be `want`.
absl::Status CheckDatatype(const InputTensor& in, DataType want) {
  absl::StatusOr<DataType> got = ParseKServeName(in.datatype());
  if (!got.ok()) {
    return Invalid("input ", Quoted(in.name()), ": datatype ",
                   in.datatype().empty() ? "(none)" : in.datatype().substr(0, 32),
                   " is not supported (the model takes ", KServeName(want), ")");
  }
  if (*got != want) {
    return Invalid("input ", Quoted(in.name()), ": datatype ", KServeName(*got),
                   " does not match the model's ", KServeName(want));
  }
  return absl::OkStatus();
}

// Where input `in`'s `bytes` bytes lie in KServe v2's typed field for
// `want`, checked to hold as many; BOOL, one byte per value, is made into
// `*bools` (its values are bools, not bytes).
absl::StatusOr<const char*> TypedContents(const InputTensor& in, DataType want, const Shape& shape,
                                          uint64_t bytes, Tensor* bools) {
  const auto& c = in.contents();
  int64_t count = -1;
  const char* field = "";
  switch (want) {
    case DT_FLOAT32: count = c.fp32_contents_size(); field = "fp32_contents"; break;
    case DT_INT64: count = c.int64_contents_size(); field = "int64_contents"; break;
    case DT_INT32: count = c.int_contents_size(); field = "int_contents"; break;
    case DT_BOOL: count = c.bool_contents_size(); field = "bool_contents"; break;
    default:
      return Invalid("input ", Quoted(in.name()), ": ", KServeName(want),
                     " has no typed contents field in KServe v2; send it in raw_input_contents");
  }
  const int element = ElementSize(want);
  if (static_cast<uint64_t>(count) * element != bytes) {
    return Invalid("input ", Quoted(in.name()), ": contents.", field, " holds ", count,
                   " values, but ", ShapeToString(shape), " needs ", bytes / element);
  }
  if (want == DT_FLOAT32) return reinterpret_cast<const char*>(c.fp32_contents().data());
  if (want == DT_INT64) return reinterpret_cast<const char*>(c.int64_contents().data());
  if (want == DT_INT32) return reinterpret_cast<const char*>(c.int_contents().data());
  ASSIGN_OR_RETURN(*bools, Tensor::TryEmpty(shape, want));
  for (int64_t i = 0; i < count; ++i) bools->data_as<uint8_t>()[i] = c.bool_contents(i) ? 1 : 0;
  return nullptr;
}

// Input `in` as a tensor of `want` (its datatype checked), from `raw` (its
// raw_input_contents, null when the request uses typed contents). Sizes
// first: nothing is allocated for a shape the request does not back.
absl::StatusOr<Tensor> ParseInput(const InputTensor& in, const std::string* raw, DataType want) {
  RETURN_IF_ERROR(CheckDatatype(in, want));
  Shape shape(in.shape().begin(), in.shape().end());
  absl::StatusOr<uint64_t> bytes = CheckedDataByteSize(shape, ElementSize(want));
  if (!bytes.ok()) return Invalid("input ", Quoted(in.name()), ": ", bytes.status().message());
  const char* source = nullptr;
  if (raw != nullptr) {
    if (in.has_contents()) {
      return Invalid("input ", Quoted(in.name()),
                     ": contents must be empty when raw_input_contents is used");
    }
    if (raw->size() != *bytes) {
      return Invalid("input ", Quoted(in.name()), ": raw contents hold ", raw->size(),
                     " bytes, but ", KServeName(want), " ", ShapeToString(shape), " needs ",
                     *bytes);
    }
    source = raw->data();
  } else {
    Tensor bools;
    ASSIGN_OR_RETURN(source, TypedContents(in, want, shape, *bytes, &bools));
    if (source == nullptr) return bools;
  }
  ASSIGN_OR_RETURN(Tensor t, Tensor::TryEmpty(shape, want));
  if (*bytes > 0) std::memcpy(t.raw_data(), source, *bytes);
  if (want == DT_BOOL) {
    for (int64_t i = 0; i < t.numel(); ++i) {
      if (t.data_as<uint8_t>()[i] > 1) {
        return Invalid("input ", Quoted(in.name()), ": BOOL byte ", i, " is ",
                       static_cast<int>(t.data_as<uint8_t>()[i]), " (must be 0 or 1)");
      }
    }
  }
  return t;
}

}  // namespace

absl::StatusOr<std::vector<Tensor>> ParseInferInputs(const inference::ModelInferRequest& req,
                                                     const Plan& plan) {
  const bool raw = req.raw_input_contents_size() > 0;
  if (raw && req.raw_input_contents_size() != req.inputs_size()) {
    return Invalid("raw_input_contents has ", req.raw_input_contents_size(), " entries for ",
                   req.inputs_size(), " inputs (one per input, in order)");
  }
  absl::flat_hash_map<std::string, int> want;
  for (int i = 0; i < plan.inputs_size(); ++i) want[plan.inputs(i).name()] = i;
  std::vector<Tensor> tensors(plan.inputs_size());
  std::vector<bool> seen(plan.inputs_size(), false);
  for (int k = 0; k < req.inputs_size(); ++k) {
    const InputTensor& in = req.inputs(k);
    auto it = want.find(in.name());
    if (it == want.end()) {
      return Invalid("unexpected input ", Quoted(in.name()), " (the model's inputs: ",
                     InputNames(plan), ")");
    }
    if (seen[it->second]) return Invalid("input ", Quoted(in.name()), " is given twice");
    seen[it->second] = true;
    const DataType type = plan.inputs(it->second).dtype();
    ASSIGN_OR_RETURN(tensors[it->second],
                     ParseInput(in, raw ? &req.raw_input_contents(k) : nullptr,
                                type == DT_INVALID ? DT_FLOAT32 : type));
  }
  for (int i = 0; i < plan.inputs_size(); ++i) {
    if (!seen[i]) {
      return Invalid("missing input \"", plan.inputs(i).name(), "\" (the model's inputs: ",
                     InputNames(plan), ")");
    }
  }
  return tensors;
}

absl::StatusOr<std::vector<int>> ChooseOutputs(const inference::ModelInferRequest& req,
                                               const Plan& plan) {
  std::vector<int> chosen;
  if (req.outputs_size() == 0) {
    for (int j = 0; j < plan.outputs_size(); ++j) chosen.push_back(j);
    return chosen;
  }
  std::vector<bool> taken(plan.outputs_size(), false);
  for (const auto& o : req.outputs()) {
    int found = -1;
    for (int j = 0; j < plan.outputs_size(); ++j) {
      if (plan.outputs(j).name() == o.name()) found = j;
    }
    if (found < 0) return Invalid("unknown output ", Quoted(o.name()), " requested");
    if (taken[found]) return Invalid("output ", Quoted(o.name()), " is requested twice");
    taken[found] = true;
    chosen.push_back(found);
  }
  return chosen;
}

void BuildInferResponse(const inference::ModelInferRequest& req, const Plan& plan,
                        const std::vector<int>& chosen, const std::vector<Tensor>& outputs,
                        inference::ModelInferResponse* resp) {
  resp->set_model_name(req.model_name());
  resp->set_model_version(kModelVersion);
  resp->set_id(req.id());
  for (int j : chosen) {
    auto* o = resp->add_outputs();
    o->set_name(plan.outputs(j).name());
    o->set_datatype(KServeName(outputs[j].dtype()));
    for (int64_t d : outputs[j].shape()) o->add_shape(d);
    resp->add_raw_output_contents(static_cast<const char*>(outputs[j].raw_data()),
                                  outputs[j].byte_size());
  }
}

}  // namespace pipeserve
