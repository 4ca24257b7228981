#include "server/coordinator/kserve_json.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"
#include "runtime/dtype.h"

namespace pipeserve {
namespace {

using Json = nlohmann::json;

template <typename... Args>
absl::Status Invalid(const Args&... args) {
  return absl::InvalidArgumentError(absl::StrCat(args...));
}

// Nesting of arrays and objects, counted before parsing (outside strings).
absl::Status CheckDepth(absl::string_view body) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (char c : body) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) {
        return Invalid("the JSON nests deeper than ", kMaxJsonDepth, " levels");
      }
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Json> ParseJsonBody(absl::string_view body) {
  RETURN_IF_ERROR(CheckDepth(body));
  Json j = Json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    // Parse again for the parser's own account of where and why.
    try {
      (void)Json::parse(body.begin(), body.end());
    } catch (const Json::exception& e) {
      return Invalid("the request is not valid JSON: ", e.what());
    }
    return Invalid("the request is not valid JSON");
  }
  return j;
}

namespace {

template <typename T>
void Append(T v, std::string* raw) {
  raw->append(reinterpret_cast<const char*>(&v), sizeof v);
}

// One value of input `name` as `dt`, appended to `raw`.
absl::Status AppendValue(const Json& v, const std::string& name, DataType dt, std::string* raw) {
  auto wrong = [&](const char* want) {
    return Invalid("input \"", name, "\": ", KServeName(dt), " data must be ", want, ", not ",
                   v.dump().substr(0, 40));
  };
  switch (dt) {
    case DT_BOOL:
      if (!v.is_boolean()) return wrong("true or false");
      Append<uint8_t>(v.get<bool>() ? 1 : 0, raw);
      return absl::OkStatus();
    case DT_INT64:
    case DT_INT32: {
      if (!v.is_number_integer()) return wrong("integers");
      const bool fits64 = !v.is_number_unsigned() ||
                          v.get<uint64_t>() <= uint64_t{std::numeric_limits<int64_t>::max()};
      const int64_t x = fits64 ? v.get<int64_t>() : 0;
      if (!fits64 || (dt == DT_INT32 && (x < std::numeric_limits<int32_t>::min() ||
                                         x > std::numeric_limits<int32_t>::max()))) {
        return Invalid("input \"", name, "\": ", v.dump(), " is outside ", KServeName(dt),
                       "'s range");
      }
      if (dt == DT_INT64) {
        Append<int64_t>(x, raw);
      } else {
        Append<int32_t>(static_cast<int32_t>(x), raw);
      }
      return absl::OkStatus();
    }
    case DT_FLOAT32: {
      if (!v.is_number()) return wrong("numbers");
      const double x = v.get<double>();
      if (!(std::abs(x) <= FLT_MAX)) {
        return Invalid("input \"", name, "\": ", v.dump(), " is outside FP32's range");
      }
      Append<float>(static_cast<float>(x), raw);
      return absl::OkStatus();
    }
    default:
      return Invalid("input \"", name, "\": ", KServeName(dt),
                     " travels only as binary data (Triton's binary tensor extension: "
                     "\"parameters\": {\"binary_data_size\": N}), not in JSON");
  }
}

// Input `name`'s data (flat or nested arrays, row-major), appended to `raw`.
absl::Status Flatten(const Json& data, const std::string& name, DataType dt, std::string* raw,
                     int64_t* count) {
  if (!data.is_array()) {
    ++*count;
    return AppendValue(data, name, dt, raw);
  }
  for (const Json& v : data) RETURN_IF_ERROR(Flatten(v, name, dt, raw, count));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> ShapeOf(const Json& in, const std::string& name) {
  const Json& shape = in.contains("shape") ? in["shape"] : Json();
  if (!shape.is_array()) return Invalid("input \"", name, "\": \"shape\" must be an array");
  std::vector<int64_t> dims;
  for (const Json& d : shape) {
    const bool ok = d.is_number_unsigned()
                        ? d.get<uint64_t>() <= uint64_t{std::numeric_limits<int64_t>::max()}
                        : d.is_number_integer() && d.get<int64_t>() >= 0;
    if (!ok) {
      return Invalid("input \"", name, "\": shape ", shape.dump().substr(0, 80),
                     " must hold non-negative integers");
    }
    dims.push_back(d.get<int64_t>());
  }
  return dims;
}

// The bytes an input's "parameters" say follow the JSON
// ("binary_data_size"), or -1 when its data is in the JSON.
absl::StatusOr<int64_t> BinarySize(const Json& in, const std::string& name) {
  if (!in.contains("parameters")) return -1;
  const Json& p = in["parameters"];
  if (!p.is_object()) return Invalid("input \"", name, "\": \"parameters\" must be an object");
  if (!p.contains("binary_data_size")) return -1;
  const Json& size = p["binary_data_size"];
  if (!size.is_number_unsigned()) {
    return Invalid("input \"", name, "\": binary_data_size must be a non-negative integer");
  }
  return static_cast<int64_t>(std::min<uint64_t>(size.get<uint64_t>(), INT64_MAX));
}

// One JSON input into `req` (its tensor metadata and raw contents); a
// binary one takes its bytes from the front of *binary.
absl::Status AddInput(const Json& in, absl::string_view* binary,
                      inference::ModelInferRequest* req) {
  if (!in.is_object() || !in.contains("name") || !in["name"].is_string()) {
    return Invalid("each input must be an object with a string \"name\"");
  }
  const std::string name = in["name"].get<std::string>();
  if (!in.contains("datatype") || !in["datatype"].is_string()) {
    return Invalid("input \"", name, "\": \"datatype\" must be a string");
  }
  absl::StatusOr<DataType> dt = ParseKServeName(in["datatype"].get<std::string>());
  if (!dt.ok()) return Invalid("input \"", name, "\": ", dt.status().message());
  ASSIGN_OR_RETURN(std::vector<int64_t> shape, ShapeOf(in, name));
  ASSIGN_OR_RETURN(const int64_t binary_size, BinarySize(in, name));
  if (binary_size < 0 && !in.contains("data")) {
    return Invalid("input \"", name, "\" has no \"data\" (nor a binary_data_size)");
  }
  auto* t = req->add_inputs();
  t->set_name(name);
  t->set_datatype(in["datatype"].get<std::string>());
  uint64_t want = 1;  // saturating: a shape beyond any data is refused below
  for (int64_t d : shape) {
    t->add_shape(d);
    const uint64_t u = static_cast<uint64_t>(d);
    want = u != 0 && want > std::numeric_limits<uint64_t>::max() / u
               ? std::numeric_limits<uint64_t>::max()
               : want * u;
  }
  std::string* raw = req->add_raw_input_contents();
  if (binary_size >= 0) {
    if (in.contains("data")) {
      return Invalid("input \"", name, "\" has both \"data\" and a binary_data_size");
    }
    if (static_cast<uint64_t>(binary_size) > binary->size()) {
      return Invalid("input \"", name, "\": binary_data_size ", binary_size, " is more than the ",
                     binary->size(), " bytes left after the JSON");
    }
    const uint64_t element = ElementSize(*dt);
    if (want > std::numeric_limits<uint64_t>::max() / element ||
        static_cast<uint64_t>(binary_size) != want * element) {
      return Invalid("input \"", name, "\": binary_data_size ", binary_size, " does not fit ",
                     KServeName(*dt), " ", in["shape"].dump(), " (", want, " x ", element,
                     " bytes)");
    }
    raw->assign(binary->data(), binary_size);
    binary->remove_prefix(binary_size);
    return absl::OkStatus();
  }
  int64_t count = 0;
  RETURN_IF_ERROR(Flatten(in["data"], name, *dt, raw, &count));
  if (static_cast<uint64_t>(count) != want) {
    return Invalid("input \"", name, "\": data holds ", count, " values, but shape ",
                   in["shape"].dump(), " needs ", want);
  }
  return absl::OkStatus();
}

// Whether `j`'s "parameters" hold `key` true; kInvalidArgument when it is
// there and not a bool.
absl::StatusOr<bool> BoolParameter(const Json& j, const char* key, const std::string& what) {
  if (!j.contains("parameters")) return false;
  const Json& p = j["parameters"];
  if (!p.is_object()) return Invalid(what, ": \"parameters\" must be an object");
  if (!p.contains(key)) return false;
  if (!p[key].is_boolean()) return Invalid(what, ": ", key, " must be true or false");
  return p[key].get<bool>();
}

void SetBool(google::protobuf::Map<std::string, inference::InferParameter>* params,
             const char* key) {
  (*params)[key].set_bool_param(true);
}

bool GetBool(const google::protobuf::Map<std::string, inference::InferParameter>& params,
             const char* key) {
  auto it = params.find(key);
  return it != params.end() && it->second.bool_param();
}

// `raw`'s elements of `dt` as a JSON array.
absl::StatusOr<Json> DataOf(const std::string& name, DataType dt, const std::string& raw) {
  Json data = Json::array();
  const size_t size = ElementSize(dt);
  for (size_t i = 0; size > 0 && i + size <= raw.size(); i += size) {
    const char* p = raw.data() + i;
    switch (dt) {
      case DT_BOOL: data.push_back(*p != 0); break;
      case DT_INT64: { int64_t v; std::memcpy(&v, p, 8); data.push_back(v); break; }
      case DT_INT32: { int32_t v; std::memcpy(&v, p, 4); data.push_back(v); break; }
      case DT_FLOAT32: { float v; std::memcpy(&v, p, 4); data.push_back(v); break; }
      default:
        return Invalid("output \"", name, "\" is ", KServeName(dt),
                       ", which travels only as binary data: ask for it with \"parameters\": "
                       "{\"binary_data\": true} (Triton's binary tensor extension)");
    }
  }
  return data;
}

}  // namespace

absl::StatusOr<inference::ModelInferRequest> InferRequestFromJson(absl::string_view body,
                                                                  const std::string& model,
                                                                  const std::string& version,
                                                                  int64_t json_length) {
  if (json_length > static_cast<int64_t>(body.size())) {
    return Invalid("Inference-Header-Content-Length ", json_length, " is more than the body's ",
                   body.size(), " bytes");
  }
  absl::string_view binary;
  if (json_length >= 0) {
    binary = body.substr(json_length);
    body = body.substr(0, json_length);
  }
  ASSIGN_OR_RETURN(Json j, ParseJsonBody(body));
  if (!j.is_object()) return Invalid("the request must be a JSON object");
  inference::ModelInferRequest req;
  req.set_model_name(model);
  req.set_model_version(version);
  if (j.contains("id")) {
    if (!j["id"].is_string()) return Invalid("\"id\" must be a string");
    req.set_id(j["id"].get<std::string>());
  }
  ASSIGN_OR_RETURN(bool all_binary, BoolParameter(j, "binary_data_output", "the request"));
  if (all_binary) SetBool(req.mutable_parameters(), "binary_data_output");
  if (!j.contains("inputs") || !j["inputs"].is_array()) {
    return Invalid("the request needs \"inputs\": an array of tensors");
  }
  for (const Json& in : j["inputs"]) RETURN_IF_ERROR(AddInput(in, &binary, &req));
  if (!binary.empty()) {
    return Invalid(binary.size(), " bytes after the JSON belong to no input's binary_data_size");
  }
  if (j.contains("outputs")) {
    if (!j["outputs"].is_array()) return Invalid("\"outputs\" must be an array");
    for (const Json& out : j["outputs"]) {
      if (!out.is_object() || !out.contains("name") || !out["name"].is_string()) {
        return Invalid("each requested output must be an object with a string \"name\"");
      }
      auto* o = req.add_outputs();
      o->set_name(out["name"].get<std::string>());
      ASSIGN_OR_RETURN(bool binary_out,
                       BoolParameter(out, "binary_data", absl::StrCat("output \"", o->name(), "\"")));
      if (binary_out) SetBool(o->mutable_parameters(), "binary_data");
    }
  }
  return req;
}

absl::StatusOr<RestBody> InferResponseToJson(const inference::ModelInferResponse& resp,
                                             const inference::ModelInferRequest& req) {
  const bool all_binary = GetBool(req.parameters(), "binary_data_output");
  Json j;
  j["model_name"] = resp.model_name();
  j["model_version"] = resp.model_version();
  if (!resp.id().empty()) j["id"] = resp.id();
  j["outputs"] = Json::array();
  std::string binary;
  bool any_binary = false;
  for (int i = 0; i < resp.outputs_size(); ++i) {
    const auto& out = resp.outputs(i);
    ASSIGN_OR_RETURN(DataType dt, ParseKServeName(out.datatype()));
    Json o;
    o["name"] = out.name();
    o["datatype"] = out.datatype();
    o["shape"] = std::vector<int64_t>(out.shape().begin(), out.shape().end());
    const std::string raw = i < resp.raw_output_contents_size() ? resp.raw_output_contents(i) : "";
    bool as_binary = all_binary;
    for (const auto& wanted : req.outputs()) {
      if (wanted.name() == out.name()) as_binary = as_binary || GetBool(wanted.parameters(), "binary_data");
    }
    if (as_binary) {
      o["parameters"] = {{"binary_data_size", raw.size()}};
      binary += raw;
      any_binary = true;
    } else {
      ASSIGN_OR_RETURN(o["data"], DataOf(out.name(), dt, raw));
    }
    j["outputs"].push_back(std::move(o));
  }
  RestBody body;
  body.body = j.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (any_binary) {
    body.json_length = static_cast<int64_t>(body.body.size());
    body.body += binary;
  }
  return body;
}

std::string ServerMetadataToJson(const inference::ServerMetadataResponse& m) {
  Json j;
  j["name"] = m.name();
  j["version"] = m.version();
  j["extensions"] = std::vector<std::string>(m.extensions().begin(), m.extensions().end());
  return j.dump(-1, ' ', false, Json::error_handler_t::replace);
}

std::string ModelMetadataToJson(const inference::ModelMetadataResponse& m) {
  Json j;
  j["name"] = m.name();
  j["versions"] = std::vector<std::string>(m.versions().begin(), m.versions().end());
  j["platform"] = m.platform();
  for (const char* kind : {"inputs", "outputs"}) {
    const auto& tensors = std::string(kind) == "inputs" ? m.inputs() : m.outputs();
    j[kind] = Json::array();
    for (const auto& t : tensors) {
      j[kind].push_back({{"name", t.name()},
                         {"datatype", t.datatype()},
                         {"shape", std::vector<int64_t>(t.shape().begin(), t.shape().end())}});
    }
  }
  return j.dump(-1, ' ', false, Json::error_handler_t::replace);
}

std::string ErrorJson(absl::string_view message) {
  return Json{{"error", std::string(message)}}.dump(-1, ' ', false,
                                                   Json::error_handler_t::replace);
}

}  // namespace pipeserve
