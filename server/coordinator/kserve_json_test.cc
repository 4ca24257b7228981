#include "server/coordinator/kserve_json.h"

#include <cstring>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

std::string ErrorOf(const std::string& body) {
  auto req = InferRequestFromJson(body, "m", "");
  EXPECT_FALSE(req.ok()) << body;
  EXPECT_EQ(req.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(req.status().message());
}

TEST(KServeJsonTest, NestedAndFlatDataPackIntoRawContents) {
  auto req = InferRequestFromJson(
      R"({"id": "r1", "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2.5], [-3, 4]]},
            {"name": "ids", "datatype": "INT64", "shape": [3], "data": [1, -2, 9007199254740993]},
            {"name": "b", "datatype": "BOOL", "shape": [2], "data": [true, false]}],
          "outputs": [{"name": "y"}]})",
      "mlp", "2");
  ASSERT_TRUE(req.ok()) << req.status();
  EXPECT_EQ(req->model_name(), "mlp");
  EXPECT_EQ(req->model_version(), "2");
  EXPECT_EQ(req->id(), "r1");
  ASSERT_EQ(req->raw_input_contents_size(), 3);
  float x[4];
  std::memcpy(x, req->raw_input_contents(0).data(), 16);
  EXPECT_EQ(x[1], 2.5f);
  EXPECT_EQ(x[2], -3.0f);
  int64_t ids[3];
  std::memcpy(ids, req->raw_input_contents(1).data(), 24);
  EXPECT_EQ(ids[2], 9007199254740993) << "int64 beyond a double's 53 bits stays exact";
  EXPECT_EQ(req->raw_input_contents(2), std::string("\x01\x00", 2));
  EXPECT_EQ(req->outputs(0).name(), "y");
}

// Data is converted as it is read when "datatype" came first, and kept
// until the datatype is known otherwise: both give the same bytes.
TEST(KServeJsonTest, DataBeforeItsDatatypeAndNameIsConvertedToo) {
  auto req = InferRequestFromJson(
      R"({"inputs": [{"data": [[1, 2.5], [-3, 4]], "shape": [2, 2], "name": "x", "datatype": "FP32"},
                     {"name": "n", "datatype": "INT32", "shape": [], "data": 7}]})",
      "m", "");
  ASSERT_TRUE(req.ok()) << req.status();
  float x[4];
  std::memcpy(x, req->raw_input_contents(0).data(), 16);
  EXPECT_EQ(x[1], 2.5f);
  EXPECT_EQ(x[3], 4.0f);
  int32_t n;
  std::memcpy(&n, req->raw_input_contents(1).data(), 4);
  EXPECT_EQ(n, 7);
  EXPECT_THAT(ErrorOf(R"({"inputs": [{"data": [1.5], "name": "x", "datatype": "INT64", "shape": [1]}]})"),
              HasSubstr("input \"x\": INT64 data must be integers, not 1.5"));
  EXPECT_THAT(ErrorOf(R"({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "data": [2]}]})"),
              HasSubstr("has \"data\" twice"));
  EXPECT_THAT(ErrorOf(R"({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [{"a": 1}]}]})"),
              HasSubstr("input \"x\": data must be numbers or booleans (in nested arrays), not an object"));
  EXPECT_THAT(ErrorOf(R"({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["1"]}]})"),
              HasSubstr("FP32 data must be numbers, not \"1\""));
  // "data" elsewhere is not an input's.
  auto other = InferRequestFromJson(
      R"({"parameters": {"p": {"data": [1, 2]}}, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]})",
      "m", "");
  EXPECT_TRUE(other.ok()) << other.status();
}

TEST(KServeJsonTest, BadRequestsAreRefusedNamingWhatIsWrong) {
  EXPECT_THAT(ErrorOf("{\"inputs\": ["), HasSubstr("not valid JSON"));
  EXPECT_THAT(ErrorOf("{\"inputs\": [{\"name\": \"\xFF\"}]}"), HasSubstr("not valid JSON"));
  EXPECT_THAT(ErrorOf(std::string(100, '[') + std::string(100, ']')),
              HasSubstr("nests deeper than 32 levels"));
  EXPECT_THAT(ErrorOf("[]"), HasSubstr("must be a JSON object"));
  EXPECT_THAT(ErrorOf("{}"), HasSubstr("needs \"inputs\""));
  EXPECT_THAT(ErrorOf(R"({"inputs": [{"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}]})"),
              HasSubstr("input \"x\": "));
  EXPECT_THAT(ErrorOf(R"({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1, 2]}]})"),
              HasSubstr("data holds 2 values, but shape [2,3] needs 6"));
  EXPECT_THAT(ErrorOf(R"({"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [3000000000]}]})"),
              HasSubstr("3000000000 is outside INT32's range"));
  EXPECT_THAT(ErrorOf(R"({"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [1.5]}]})"),
              HasSubstr("INT64 data must be integers"));
  EXPECT_THAT(ErrorOf(R"({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1e300]}]})"),
              HasSubstr("outside FP32's range"));
  EXPECT_THAT(ErrorOf(R"({"inputs": [{"name": "x", "datatype": "BF16", "shape": [1], "data": [1]}]})"),
              HasSubstr("BF16 travels only as binary data"));
  EXPECT_THAT(ErrorOf(R"({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": []}]})"),
              HasSubstr("must hold non-negative integers"));
  EXPECT_THAT(ErrorOf(R"({"inputs": [{"name": "x", "datatype": "FP32", "shape": [4294967296, 4294967296], "data": [1]}]})"),
              HasSubstr("data holds 1 values"));
}

TEST(KServeJsonTest, ResponsesCarryEachOutputsData) {
  inference::ModelInferResponse resp;
  resp.set_model_name("mlp");
  resp.set_model_version("1");
  auto* o = resp.add_outputs();
  o->set_name("y");
  o->set_datatype("FP32");
  o->add_shape(1);
  o->add_shape(2);
  const float y[2] = {0.5f, -1.0f};
  resp.add_raw_output_contents(std::string(reinterpret_cast<const char*>(y), 8));
  auto json = InferResponseToJson(resp);
  ASSERT_TRUE(json.ok()) << json.status();
  EXPECT_EQ(json->body, R"({"model_name":"mlp","model_version":"1","outputs":[{"data":[0.5,-1.0],)"
                        R"("datatype":"FP32","name":"y","shape":[1,2]}]})");
  EXPECT_EQ(json->json_length, -1);
  o->set_datatype("BF16");
  EXPECT_THAT(std::string(InferResponseToJson(resp).status().message()),
              HasSubstr("output \"y\" is BF16, which travels only as binary data"));
  // Asked for as binary: its bytes after the JSON.
  inference::ModelInferRequest req;
  (*req.mutable_parameters())["binary_data_output"].set_bool_param(true);
  auto binary = InferResponseToJson(resp, req);
  ASSERT_TRUE(binary.ok()) << binary.status();
  ASSERT_GT(binary->json_length, 0);
  EXPECT_THAT(binary->body.substr(0, binary->json_length), HasSubstr(R"("binary_data_size":8)"));
  EXPECT_EQ(binary->body.substr(binary->json_length), std::string(reinterpret_cast<const char*>(y), 8));
}

// An output's own "binary_data": false overrides the request's
// "binary_data_output": true for that output (Triton's binary data
// extension); the other output stays binary.
TEST(KServeJsonTest, AnOutputsOwnBinaryDataFalseOverridesTheRequestsFlag) {
  const std::string body =
      R"({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],)"
      R"( "parameters": {"binary_data_output": true},)"
      R"( "outputs": [{"name": "y", "parameters": {"binary_data": false}}, {"name": "z"}]})";
  auto req = InferRequestFromJson(body, "mlp", "");
  ASSERT_TRUE(req.ok()) << req.status();
  inference::ModelInferResponse resp;
  const float y[2] = {0.5f, -1.0f};
  for (const char* name : {"y", "z"}) {
    auto* o = resp.add_outputs();
    o->set_name(name);
    o->set_datatype("FP32");
    o->add_shape(2);
    resp.add_raw_output_contents(std::string(reinterpret_cast<const char*>(y), 8));
  }
  auto json = InferResponseToJson(resp, *req);
  ASSERT_TRUE(json.ok()) << json.status();
  ASSERT_GT(json->json_length, 0);
  const std::string head = json->body.substr(0, json->json_length);
  EXPECT_THAT(head, HasSubstr(R"({"data":[0.5,-1.0],"datatype":"FP32","name":"y")"));
  EXPECT_THAT(head, HasSubstr(R"("name":"z","parameters":{"binary_data_size":8})"));
  EXPECT_EQ(json->body.substr(json->json_length), std::string(reinterpret_cast<const char*>(y), 8));
}

// Triton's binary tensor extension: the JSON, then each binary input's bytes.
TEST(KServeJsonTest, BinaryInputsFollowTheJson) {
  const std::string json =
      R"({"inputs": [{"name": "h", "datatype": "BF16", "shape": [2], "parameters": {"binary_data_size": 4}},)"
      R"( {"name": "x", "datatype": "FP32", "shape": [1], "data": [2]},)"
      R"( {"name": "i", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": 8}}],)"
      R"( "outputs": [{"name": "y", "parameters": {"binary_data": true}}]})";
  const std::string bytes("\x80\x3f\x00\x40" "\x07\0\0\0\0\0\0\0", 12);
  auto req = InferRequestFromJson(json + bytes, "m", "", json.size());
  ASSERT_TRUE(req.ok()) << req.status();
  EXPECT_EQ(req->raw_input_contents(0), bytes.substr(0, 4));
  EXPECT_EQ(req->raw_input_contents(2), bytes.substr(4));
  EXPECT_TRUE(req->outputs(0).parameters().at("binary_data").bool_param());
  EXPECT_THAT(std::string(InferRequestFromJson(json + bytes + "x", "m", "", json.size())
                              .status().message()),
              HasSubstr("1 bytes after the JSON belong to no input"));
  EXPECT_THAT(std::string(InferRequestFromJson(json + bytes.substr(0, 6), "m", "", json.size())
                              .status().message()),
              HasSubstr("binary_data_size 8 is more than the 2 bytes left"));
  EXPECT_THAT(std::string(InferRequestFromJson(json, "m", "", json.size() + 1).status().message()),
              HasSubstr("Inference-Header-Content-Length"));
  // A shape whose byte size wraps around 2^64 does not pass for 0 bytes.
  const std::string wraps =
      R"({"inputs": [{"name": "w", "datatype": "FP32", "shape": [4611686018427387904], "parameters": {"binary_data_size": 0}}]})";
  EXPECT_THAT(std::string(InferRequestFromJson(wraps, "m", "", wraps.size()).status().message()),
              HasSubstr("binary_data_size 0 does not fit FP32"));
  const std::string odd =
      R"({"inputs": [{"name": "h", "datatype": "BF16", "shape": [3], "parameters": {"binary_data_size": 4}}]})";
  EXPECT_THAT(std::string(InferRequestFromJson(odd + "abcd", "m", "", odd.size()).status().message()),
              HasSubstr("binary_data_size 4 does not fit BF16 [3] (3 x 2 bytes)"));
}

TEST(KServeJsonTest, ErrorsAreJsonEvenForBadBytes) {
  EXPECT_EQ(ErrorJson("bad \"x\""), R"({"error":"bad \"x\""})");
  EXPECT_EQ(ErrorJson("\xFF"), "{\"error\":\"\xEF\xBF\xBD\"}");
}

}  // namespace
}  // namespace pipeserve
