#include "server/coordinator/kserve_request.h"

#include <cstring>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"

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
    const auto& in = req.inputs(k);
    auto it = want.find(in.name());
    if (it == want.end()) {
      return Invalid("unexpected input ", Quoted(in.name()), " (the model's inputs: ",
                     InputNames(plan), ")");
    }
    if (seen[it->second]) return Invalid("input ", Quoted(in.name()), " is given twice");
    seen[it->second] = true;
    if (in.datatype() != "FP32") {
      return Invalid("input ", Quoted(in.name()), ": datatype ",
                     in.datatype().empty() ? "(none)" : in.datatype().substr(0, 32),
                     " is not supported (expected FP32)");
    }
    Shape shape(in.shape().begin(), in.shape().end());
    absl::StatusOr<uint64_t> bytes = CheckedByteSize(shape, 4);
    if (!bytes.ok()) return Invalid("input ", Quoted(in.name()), ": ", bytes.status().message());
    // Sizes first: nothing is allocated for a shape the request does not
    // back with bytes.
    const char* source = nullptr;
    if (raw) {
      if (in.has_contents()) {
        return Invalid("input ", Quoted(in.name()),
                       ": contents must be empty when raw_input_contents is used");
      }
      const std::string& data = req.raw_input_contents(k);
      if (data.size() != *bytes) {
        return Invalid("input ", Quoted(in.name()), ": raw contents hold ", data.size(),
                       " bytes, but FP32 ", ShapeToString(shape), " needs ", *bytes);
      }
      source = data.data();
    } else {
      const auto& values = in.contents().fp32_contents();
      if (static_cast<uint64_t>(values.size()) * 4 != *bytes) {
        return Invalid("input ", Quoted(in.name()), ": contents.fp32_contents holds ",
                       values.size(), " values, but ", ShapeToString(shape), " needs ",
                       *bytes / 4);
      }
      source = reinterpret_cast<const char*>(values.data());
    }
    ASSIGN_OR_RETURN(Tensor t, Tensor::TryEmpty(shape));
    if (*bytes > 0) std::memcpy(t.data(), source, *bytes);
    tensors[it->second] = std::move(t);
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
    o->set_datatype("FP32");
    for (int64_t d : outputs[j].shape()) o->add_shape(d);
    resp->add_raw_output_contents(reinterpret_cast<const char*>(outputs[j].data()),
                                  outputs[j].byte_size());
  }
}

}  // namespace pipeserve
