// Writes the fuzz targets' seed corpora: well-formed inputs of each kind,
// which the fuzzers mutate from and the corpus tests run on every build.
//
//   bazel run //fuzz:make_seeds -- $PWD/fuzz/corpus
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "partitioner/graph_builder.h"
#include "partitioner/partition.h"
#include "proto/grpc_service.pb.h"
#include "runtime/model_file.h"
#include "server/stage/stage_spec.h"
#include "server/transport/frame.h"

namespace pipeserve {
namespace {

void Write(const std::string& path, const std::string& bytes) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

std::string FileBytes(const Model& m) {
  std::string path = std::filesystem::temp_directory_path() / "seed.psm";
  WriteModelFile(path, m.graph, m.weights).IgnoreError();
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Small models that cover the graph features: markers, split_spec, a skip
// connection, a late input, aliases, linear with bias.
std::vector<Model> Models() {
  std::vector<Model> out;
  {
    GraphBuilder b;
    b.Input("x", {-1, 4}).Input("y", {-1, 4}).Param("w", {4, 4});
    b.Op("mm", {"x", "w"}, "h").Op("relu", {"h"}, "a").Split();
    b.Op("add", {"a", "x"}, "s").Split().Op("sub", {"s", "y"}, "out").Output("out");
    out.push_back(b.Build());
  }
  {
    GraphBuilder b;
    b.Input("x", {-1, 3});
    b.Param("l0.weight", {3, 3}).Param("l0.bias", {3}).Param("l1.weight", {3, 3});
    b.Alias("l2.weight", "l1.weight");
    b.Op("linear", {"x", "l0.weight", "l0.bias"}, "h0", "l0").Op("relu", {"h0"}, "r0", "l0");
    b.Op("linear", {"r0", "l1.weight"}, "h1", "l1").Output("h1");
    b.SplitSpec("l1", BEGINNING);
    out.push_back(b.Build());
  }
  {
    GraphBuilder b;
    b.Input("x", {-1, 2}).Op("clone", {"x"}, "c").Op("mul", {"c", "x"}, "m").Output("m");
    out.push_back(b.Build());
  }
  return out;
}

void ModelFileSeeds(const std::string& dir) {
  int i = 0;
  for (const Model& m : Models()) {
    for (char stages : {'\0', '\2'}) {
      Write(absl::StrCat(dir, "/model_file_fuzz/seed", i++), std::string(1, stages) + FileBytes(m));
    }
  }
}

void FrameSeeds(const std::string& dir) {
  Frame data;
  data.header.set_request_id(7);
  data.header.set_microbatch(1);
  data.header.set_deadline_us(1234567);
  data.Add("x", Tensor::FromVector({2, 3}, {1, 2, 3, 4, 5, 6}));
  data.Add("empty", Tensor::Zeros({0, 4}));
  Frame cancel;
  cancel.header.set_kind(FrameHeader::CANCEL);
  cancel.header.set_request_id(7);
  Frame error;
  error.header.set_kind(FrameHeader::ERROR);
  error.header.set_error_code(3);
  error.header.set_error_message("stage 1: input \"x\": shape [2,5] does not match [B,4]");
  // No element, yet 2^40 rows to walk: decoding refuses it (seed6, seed7).
  Frame wide;
  wide.header.set_request_id(8);
  wide.Add("ids", Tensor::Zeros({int64_t{1} << 40, 0}, DT_INT64));
  int i = 0;
  for (const Frame* f : {&data, &cancel, &error, &wide}) {
    grpc::ByteBuffer bb;
    FrameToByteBuffer(*f, &bb).IgnoreError();
    grpc::Slice whole;
    (void)bb.DumpToSingleSlice(&whole);
    std::string bytes(reinterpret_cast<const char*>(whole.begin()), whole.size());
    for (char cut : {'\0', '\5'}) {
      Write(absl::StrCat(dir, "/frame_fuzz/seed", i++), std::string(1, cut) + bytes);
    }
  }
}

void KServeSeeds(const std::string& dir) {
  inference::ModelInferRequest raw;
  raw.set_model_name("m");
  raw.set_id("r1");
  auto* x = raw.add_inputs();
  x->set_name("x");
  x->set_datatype("FP32");
  x->add_shape(2);
  x->add_shape(4);
  raw.add_raw_input_contents(std::string(32, '\1'));
  auto* b = raw.add_inputs();
  b->set_name("bias");
  b->set_datatype("FP32");
  b->add_shape(4);
  raw.add_raw_input_contents(std::string(16, '\2'));
  raw.add_outputs()->set_name("aux");
  Write(dir + "/kserve_request_fuzz/raw", raw.SerializeAsString());
  inference::ModelInferRequest typed;
  typed.set_model_name("m");
  auto* tx = typed.add_inputs();
  tx->set_name("x");
  tx->set_datatype("FP32");
  tx->add_shape(1);
  tx->add_shape(4);
  for (int i = 0; i < 4; ++i) tx->mutable_contents()->add_fp32_contents(i);
  auto* tb = typed.add_inputs();
  tb->set_name("bias");
  tb->set_datatype("FP32");
  tb->add_shape(4);
  for (int i = 0; i < 4; ++i) tb->mutable_contents()->add_fp32_contents(-i);
  Write(dir + "/kserve_request_fuzz/typed", typed.SerializeAsString());
  // No bytes for no elements, yet 2^40 rows: refused at parsing.
  inference::ModelInferRequest wide = raw;
  wide.mutable_inputs(0)->set_shape(0, int64_t{1} << 40);
  wide.mutable_inputs(0)->set_shape(1, 0);
  wide.set_raw_input_contents(0, "");
  Write(dir + "/kserve_request_fuzz/empty_wide", wide.SerializeAsString());
}

void StageSpecSeeds(const std::string& dir) {
  int i = 0;
  for (const Model& m : Models()) {
    Plan plan = *Partition(m.graph, {});
    std::vector<std::string> servers(plan.stages_size(), "stage-1.pipeserve-stages:9000");
    for (const StageSpec& spec : MakeStageSpecs(plan, "m", 42, servers, 1)) {
      LoadStageRequest first;
      *first.mutable_spec() = spec;
      std::string s = first.SerializeAsString();
      std::string bytes = {static_cast<char>(s.size() >> 8), static_cast<char>(s.size() & 0xff)};
      bytes += s;
      if (spec.stage().graph().params_size() > 0) {
        const TensorInfo& p = spec.stage().graph().params(0);
        LoadStageRequest chunk;
        chunk.mutable_chunk()->set_fqn(p.fqn());
        chunk.mutable_chunk()->set_data(std::string(8, '\0'));
        bytes += chunk.SerializeAsString();
      }
      Write(absl::StrCat(dir, "/stage_spec_fuzz/seed", i++), bytes);
    }
  }
}

}  // namespace
}  // namespace pipeserve

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds CORPUS_DIR\n");
    return 2;
  }
  pipeserve::ModelFileSeeds(argv[1]);
  pipeserve::FrameSeeds(argv[1]);
  pipeserve::KServeSeeds(argv[1]);
  pipeserve::StageSpecSeeds(argv[1]);
  return 0;
}
