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
#include "graph/dtype.h"

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

// An infer request's "inputs"[i]."data", converted as the body is read:
// straight into raw bytes when the input's "datatype" came before its
// data (as clients write it), else kept as scalars until it is known.
struct InputData {
  bool present = false;
  std::string name;            // "name" when it came before the data
  DataType dtype = DT_INVALID;  // "datatype" when it came before the data
  std::string raw;              // converted values
  std::vector<Json> pending;    // values before the datatype was known
  int64_t count = 0;
};

// Parses an infer request with nlohmann's SAX interface: everything but the
// inputs' "data" becomes a DOM (it is small); data goes into InputData, so
// a body of numbers costs about its tensor's bytes, not a DOM of them
// (16 bytes and more per number).
class InferSax : public nlohmann::json_sax<Json> {
 public:
  Json root;
  std::vector<InputData> data;  // by index in "inputs"
  absl::Status error;

  bool null() override { return Scalar(Json(nullptr)); }
  bool boolean(bool v) override { return Scalar(Json(v)); }
  bool number_integer(number_integer_t v) override { return Scalar(Json(v)); }
  bool number_unsigned(number_unsigned_t v) override { return Scalar(Json(v)); }
  bool number_float(number_float_t v, const string_t&) override { return Scalar(Json(v)); }
  bool string(string_t& v) override { return Scalar(Json(std::move(v))); }
  bool binary(binary_t&) override { return Fail(Invalid("binary JSON values are not taken")); }
  bool start_object(std::size_t) override {
    if (in_data_) return Fail(Wrong("an object"));
    return Open(Json::object());
  }
  bool end_object() override {
    stack_.pop_back();
    return true;
  }
  bool start_array(std::size_t) override {
    if (in_data_) {
      ++data_depth_;
      return true;
    }
    return Open(Json::array());
  }
  bool end_array() override {
    if (in_data_) {
      if (--data_depth_ == 0) in_data_ = false;
      return true;
    }
    stack_.pop_back();
    return true;
  }
  bool key(string_t& k) override {
    key_ = k;
    if (k == "data" && stack_.size() == 3 && stack_[1]->is_array() && IsInputs(stack_[1])) {
      InputData& d = Current();
      if (d.present) return Fail(Invalid("an input has \"data\" twice"));
      d.present = true;
      const Json& in = *stack_[2];
      if (in.contains("name") && in["name"].is_string()) d.name = in["name"].get<std::string>();
      if (in.contains("datatype") && in["datatype"].is_string()) {
        absl::StatusOr<DataType> dt = ParseKServeName(in["datatype"].get<std::string>());
        if (dt.ok()) d.dtype = *dt;
      }
      (*stack_.back())[k] = Json();  // a placeholder: the input has data
      in_data_ = true;
      data_depth_ = 0;
    }
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) override {
    if (error.ok()) error = Invalid("the request is not valid JSON: ", e.what());
    return false;
  }

 private:
  bool IsInputs(const Json* p) const {
    auto it = root.find("inputs");
    return it != root.end() && &*it == p;
  }
  InputData& Current() {
    const size_t i = stack_[1]->size() - 1;  // the input being read
    if (data.size() <= i) data.resize(i + 1);
    return data[i];
  }
  absl::Status Wrong(const char* what) {
    return Invalid("input \"", Current().name, "\": data must be numbers or booleans (in "
                   "nested arrays), not ", what);
  }
  bool Fail(absl::Status s) {
    if (error.ok()) error = std::move(s);
    return false;
  }
  bool Scalar(Json v) {
    if (!in_data_) {
      Insert(std::move(v));
      return true;
    }
    if (data_depth_ == 0) in_data_ = false;  // "data": 5, one value
    InputData& d = Current();
    ++d.count;
    if (d.dtype == DT_INVALID) {
      d.pending.push_back(std::move(v));
      return true;
    }
    absl::Status s = AppendValue(v, d.name, d.dtype, &d.raw);
    return s.ok() || Fail(std::move(s));
  }
  bool Open(Json container) {
    stack_.push_back(Insert(std::move(container)));
    return true;
  }
  Json* Insert(Json v) {
    if (stack_.empty()) {
      root = std::move(v);
      return &root;
    }
    Json& top = *stack_.back();
    if (top.is_array()) {
      top.push_back(std::move(v));
      return &top.back();
    }
    Json& slot = top[key_];
    slot = std::move(v);
    return &slot;
  }

  std::vector<Json*> stack_;
  std::string key_;
  bool in_data_ = false;
  int data_depth_ = 0;
};

// Parses `body` (depth-checked first) with InferSax.
absl::Status ParseInferBody(absl::string_view body, InferSax* sax) {
  RETURN_IF_ERROR(CheckDepth(body));
  const bool ok = Json::sax_parse(body.begin(), body.end(), sax);
  if (!sax->error.ok()) return sax->error;
  if (!ok) return Invalid("the request is not valid JSON");
  return absl::OkStatus();
}

// Input `name`'s data as `dt` in `d.raw` (InferSax converted what came
// after the datatype; the rest is converted here).
absl::Status Convert(InputData& d, const std::string& name, DataType dt) {
  if (d.dtype != DT_INVALID && d.dtype != dt) {
    return Invalid("input \"", name, "\": \"datatype\" is given twice");
  }
  for (const Json& v : d.pending) RETURN_IF_ERROR(AppendValue(v, name, dt, &d.raw));
  d.pending = {};
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

// One JSON input into `req` (its tensor metadata and raw contents, from
// `data`); a binary one takes its bytes from the front of *binary.
absl::Status AddInput(const Json& in, InputData& data, absl::string_view* binary,
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
  RETURN_IF_ERROR(Convert(data, name, *dt));
  if (static_cast<uint64_t>(data.count) != want) {
    return Invalid("input \"", name, "\": data holds ", data.count, " values, but shape ",
                   in["shape"].dump(), " needs ", want);
  }
  *raw = std::move(data.raw);
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
             const char* key, bool value = true) {
  (*params)[key].set_bool_param(value);
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
  InferSax sax;
  RETURN_IF_ERROR(ParseInferBody(body, &sax));
  const Json& j = sax.root;
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
  sax.data.resize(j["inputs"].size());
  for (size_t i = 0; i < j["inputs"].size(); ++i) {
    RETURN_IF_ERROR(AddInput(j["inputs"][i], sax.data[i], &binary, &req));
  }
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
      // Kept when false too: it overrides the request's binary_data_output.
      if (out.contains("parameters") && out["parameters"].contains("binary_data")) {
        SetBool(o->mutable_parameters(), "binary_data", binary_out);
      }
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
    // The output's own binary_data, where it gives one, else the request's.
    bool as_binary = all_binary;
    for (const auto& wanted : req.outputs()) {
      auto own = wanted.parameters().find("binary_data");
      if (wanted.name() == out.name() && own != wanted.parameters().end()) {
        as_binary = own->second.bool_param();
      }
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

absl::StatusOr<bool> RepositoryIndexReadyFromJson(absl::string_view body) {
  if (body.find_first_not_of(" \t\r\n") == absl::string_view::npos) return false;
  ASSIGN_OR_RETURN(Json j, ParseJsonBody(body));
  if (!j.is_object()) return Invalid("the repository index request must be a JSON object");
  if (!j.contains("ready")) return false;
  if (!j["ready"].is_boolean()) return Invalid("\"ready\" must be true or false");
  return j["ready"].get<bool>();
}

std::string RepositoryIndexToJson(const inference::RepositoryIndexResponse& index) {
  Json j = Json::array();
  for (const auto& m : index.models()) {
    j.push_back({{"name", m.name()}, {"version", m.version()}, {"state", m.state()},
                 {"reason", m.reason()}});
  }
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
