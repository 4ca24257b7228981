#include "server/coordinator/kserve_json.h"

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
                     " travels only as binary data (Triton's binary tensor extension), not in "
                     "JSON");
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

// One JSON input into `req` (its tensor metadata and raw contents).
absl::Status AddInput(const Json& in, inference::ModelInferRequest* req) {
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
  if (!in.contains("data")) return Invalid("input \"", name, "\" has no \"data\"");
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
  int64_t count = 0;
  RETURN_IF_ERROR(Flatten(in["data"], name, *dt, raw, &count));
  if (static_cast<uint64_t>(count) != want) {
    return Invalid("input \"", name, "\": data holds ", count, " values, but shape ",
                   in["shape"].dump(), " needs ", want);
  }
  return absl::OkStatus();
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
                       ", which travels only as binary data (Triton's binary tensor extension), "
                       "not in JSON");
    }
  }
  return data;
}

}  // namespace

absl::StatusOr<inference::ModelInferRequest> InferRequestFromJson(absl::string_view body,
                                                                  const std::string& model,
                                                                  const std::string& version) {
  ASSIGN_OR_RETURN(Json j, ParseJsonBody(body));
  if (!j.is_object()) return Invalid("the request must be a JSON object");
  inference::ModelInferRequest req;
  req.set_model_name(model);
  req.set_model_version(version);
  if (j.contains("id")) {
    if (!j["id"].is_string()) return Invalid("\"id\" must be a string");
    req.set_id(j["id"].get<std::string>());
  }
  if (!j.contains("inputs") || !j["inputs"].is_array()) {
    return Invalid("the request needs \"inputs\": an array of tensors");
  }
  for (const Json& in : j["inputs"]) RETURN_IF_ERROR(AddInput(in, &req));
  if (j.contains("outputs")) {
    if (!j["outputs"].is_array()) return Invalid("\"outputs\" must be an array");
    for (const Json& out : j["outputs"]) {
      if (!out.is_object() || !out.contains("name") || !out["name"].is_string()) {
        return Invalid("each requested output must be an object with a string \"name\"");
      }
      req.add_outputs()->set_name(out["name"].get<std::string>());
    }
  }
  return req;
}

absl::StatusOr<std::string> InferResponseToJson(const inference::ModelInferResponse& resp) {
  Json j;
  j["model_name"] = resp.model_name();
  j["model_version"] = resp.model_version();
  if (!resp.id().empty()) j["id"] = resp.id();
  j["outputs"] = Json::array();
  for (int i = 0; i < resp.outputs_size(); ++i) {
    const auto& out = resp.outputs(i);
    ASSIGN_OR_RETURN(DataType dt, ParseKServeName(out.datatype()));
    Json o;
    o["name"] = out.name();
    o["datatype"] = out.datatype();
    o["shape"] = std::vector<int64_t>(out.shape().begin(), out.shape().end());
    const std::string raw = i < resp.raw_output_contents_size() ? resp.raw_output_contents(i) : "";
    ASSIGN_OR_RETURN(o["data"], DataOf(out.name(), dt, raw));
    j["outputs"].push_back(std::move(o));
  }
  return j.dump(-1, ' ', false, Json::error_handler_t::replace);
}

std::string ServerMetadataToJson(const inference::ServerMetadataResponse& m) {
  Json j;
  j["name"] = m.name();
  j["version"] = m.version();
  j["extensions"] = std::vector<std::string>(m.extensions().begin(), m.extensions().end());
  return j.dump();
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
  return j.dump();
}

std::string ErrorJson(absl::string_view message) {
  return Json{{"error", std::string(message)}}.dump(-1, ' ', false,
                                                   Json::error_handler_t::replace);
}

}  // namespace pipeserve
