#include "tests/fixtures.h"

#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "server/testing/temp_dir.h"
#include "common/status_macros.h"
#include "partitioner/graph_builder.h"
#include "runtime/model_file.h"
#include "runtime/npy.h"

namespace pipeserve {

std::string RunfilesRoot() {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* ws = std::getenv("TEST_WORKSPACE");
  if (srcdir != nullptr) {
    return absl::StrCat(srcdir, "/", ws != nullptr ? ws : "pipeserve");
  }
  return ".";
}

absl::StatusOr<std::string> MakeFixtures(const std::vector<std::string>& cases,
                                         int batch) {
  const std::string dir = TestTempDir(absl::StrCat("fixtures_", batch));
  std::string cmd = absl::StrCat(
      "/usr/bin/python3 ", RunfilesRoot(), "/tests/pytorch/make_fixtures.py",
      " --out ", dir, " --batch ", batch);
  for (const std::string& c : cases) absl::StrAppend(&cmd, " --case ", c);
  absl::StrAppend(&cmd, " > ", dir, ".log 2>&1");
  if (std::system(cmd.c_str()) != 0) {
    std::ifstream log(dir + ".log");
    std::string text((std::istreambuf_iterator<char>(log)),
                     std::istreambuf_iterator<char>());
    return absl::InternalError(absl::StrCat("`", cmd, "` failed:\n", text));
  }
  return dir;
}

absl::StatusOr<Fixture> LoadFixture(const std::string& dir,
                                    const std::string& name) {
  Fixture f;
  f.path = absl::StrCat(dir, "/", name, "/model.psm");
  ASSIGN_OR_RETURN(f.model, ReadModelFile(f.path));
  for (const ValueSpec& in : f.model.graph.inputs()) {
    ASSIGN_OR_RETURN(Tensor t, ReadNpy(absl::StrCat(dir, "/", name, "/in_",
                                                    in.name(), ".npy")));
    f.inputs.push_back(std::move(t));
  }
  for (int i = 0; i < f.model.graph.outputs_size(); ++i) {
    ASSIGN_OR_RETURN(Tensor t, ReadNpy(absl::StrCat(dir, "/", name, "/out_",
                                                    i, ".npy")));
    f.expected.push_back(std::move(t));
    ASSIGN_OR_RETURN(Tensor hi, ReadNpy(absl::StrCat(dir, "/", name,
                                                     "/out64hi_", i, ".npy")));
    ASSIGN_OR_RETURN(Tensor lo, ReadNpy(absl::StrCat(dir, "/", name,
                                                     "/out64lo_", i, ".npy")));
    std::vector<double> exact(hi.numel());
    for (int64_t k = 0; k < hi.numel(); ++k) {
      exact[k] = double(hi.data()[k]) + double(lo.data()[k]);
    }
    f.exact.push_back(std::move(exact));
  }
  return f;
}

std::string WriteDeepMlp(const std::string& dir) {
  GraphBuilder b;
  b.Input("x", {-1, 512});
  std::string prev = "x";
  for (int i = 0; i < 48; ++i) {
    if (i > 0 && i % 12 == 0) b.Split();
    std::string w = absl::StrCat("l", i, ".weight"), bias = absl::StrCat("l", i, ".bias");
    b.Param(w, {512, 512}).Param(bias, {512});
    b.Op("linear", {prev, w, bias}, absl::StrCat("lin", i), absl::StrCat("l", i));
    b.Op("relu", {absl::StrCat("lin", i)}, absl::StrCat("r", i));
    prev = absl::StrCat("r", i);
  }
  b.Output(prev);
  Model m = b.Build();
  std::string path = dir + "/deep.psm";
  absl::Status s = WriteModelFile(path, m.graph, m.weights);
  if (!s.ok()) {
    std::fprintf(stderr, "WriteDeepMlp: %s\n", s.ToString().c_str());
    std::abort();
  }
  return path;
}

}  // namespace pipeserve
