// The op registry's conformance suite: every case of cases.h, in every
// dtype it lists, on every compute backend, against the float64 reference.
// Prints one line per case and dtype that tools/gpu_check.sh tabulates
//   [ max_rel_err ] cpu_bfloat16 softmax_last 1.9e-03 tol 1e-02
// (the error is ||got - want|| / ||want||; integer and bool outputs must be
// equal) and, per backend and dtype, which ops it covers. The CPU backend
// must run every case; another backend covers what it compiles (the CUDA
// backend refuses what it has no kernel for), and what it covers must be
// right. The registry tests fail for an op without a case, and for a case
// the reference cannot compute.
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <set>

#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "graph/op_schema.h"
#include "runtime/conformance/cases.h"
#include "runtime/conformance/reference.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/cuda/cuda_backend.h"
#include "runtime/cuda/device_emulator.h"

namespace pipeserve {
namespace {

TEST(ConformanceRegistryTest, EveryOpHasACaseAndEveryCaseAKnownOp) {
  std::set<std::string> with_case, names;
  for (const ConformanceCase& c : ConformanceCases()) {
    with_case.insert(c.node.op());
    EXPECT_TRUE(names.insert(c.name).second) << "two cases named " << c.name;
    EXPECT_NE(FindOp(c.node.op()), nullptr) << c.name << ": unknown op " << c.node.op();
    EXPECT_FALSE(c.dtypes.empty()) << c.name;
  }
  std::vector<std::string> missing;
  for (const std::string& op : KnownOps()) {
    if (op == kParamOp || op == kPipeSplitOp) continue;  // no computation
    if (with_case.count(op) == 0) missing.push_back(op);
  }
  EXPECT_TRUE(missing.empty()) << "ops without a conformance case (runtime/conformance/cases.cc): "
                               << absl::StrJoin(missing, ", ");
}

TEST(ConformanceRegistryTest, TheReferenceComputesEveryCase) {
  for (const ConformanceCase& c : ConformanceCases()) {
    for (DataType t : c.dtypes) {
      absl::StatusOr<CaseInstance> run = Instantiate(c, t, 1);
      ASSERT_TRUE(run.ok()) << c.name << ": " << run.status();
      std::vector<RefTensor> in;
      for (const Tensor& x : run->node_inputs) in.push_back(ToRef(x));
      absl::StatusOr<RefTensor> want = ReferenceOp(run->node, in);
      EXPECT_TRUE(want.ok()) << c.name << " " << TorchName(t) << ": " << want.status();
    }
  }
}

struct BackendCase {
  std::string name;
  std::function<absl::StatusOr<std::unique_ptr<ComputeBackend>>()> make;
  bool needs_gpu = false;
  bool runs_every_case = false;  // a refusal is a failure, not a gap
};

void PrintTo(const BackendCase& b, std::ostream* os) { *os << b.name; }

std::vector<BackendCase> Backends() {
  return {{"cpu", [] { return absl::StatusOr<std::unique_ptr<ComputeBackend>>(MakeCpuBackend({})); },
           false, true},
          {"emulated",  // the CUDA backend's lowering, executed on the CPU
           [] {
             return absl::StatusOr<std::unique_ptr<ComputeBackend>>(
                 MakeDeviceEmulatorBackend(Precision::kFloat32));
           }},
          {"cuda",
           [] {
             CudaBackendOptions o;
             o.poison_buffers = true;
             o.cuda_ops = CudaOps::kUnconfirmed;  // what it checks is what a GPU confirms
             return MakeCudaBackend(o);
           },
           true}};
}

class ConformanceTest : public ::testing::TestWithParam<BackendCase> {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<ComputeBackend>> b = GetParam().make();
    if (!b.ok()) {
      absl::Status device = GetParam().needs_gpu ? CudaDeviceCount().status() : absl::OkStatus();
      if (!device.ok()) GTEST_SKIP() << GetParam().name << ": no CUDA device here: " << device;
      FAIL() << GetParam().name << " cannot be made: " << b.status();
    }
    backend_ = *std::move(b);
  }

  // Runs case `c` in `dtype`: false when the backend refuses it.
  bool Check(const ConformanceCase& c, DataType dtype) {
    const std::string where = absl::StrCat(GetParam().name, "_", TorchName(dtype), " ", c.name);
    absl::StatusOr<CaseInstance> run = Instantiate(c, dtype, 7);
    if (!run.ok()) {
      ADD_FAILURE() << where << ": " << run.status();
      return true;
    }
    auto program = backend_->Compile(run->graph, run->weights);
    if (!program.ok()) {
      if (GetParam().runs_every_case) ADD_FAILURE() << where << ": " << program.status();
      return false;
    }
    std::vector<RefTensor> in;
    for (const Tensor& x : run->node_inputs) in.push_back(ToRef(x));
    absl::StatusOr<RefTensor> want = ReferenceOp(run->node, in);
    if (!want.ok()) {  // no oracle: nothing is checked, so nothing is covered
      ADD_FAILURE() << where << ": the reference cannot compute it: " << want.status();
      return false;
    }
    for (int again = 0; again < 2; ++again) {  // a second run reuses buffers
      absl::StatusOr<std::vector<Tensor>> got = (*program)->Run(run->inputs);
      if (!got.ok()) {
        ADD_FAILURE() << where << ": " << got.status();
        return true;
      }
      const Tensor& out = (*got)[0];
      EXPECT_EQ(out.shape(), want->shape) << where;
      EXPECT_EQ(out.dtype(), want->dtype) << where;
      if (out.shape() != want->shape || out.dtype() != want->dtype) return true;
      const double err = RelativeError(out, *want);
      const double tol = IsFloatingPoint(out.dtype()) ? Tolerance(dtype) : 0.0;
      EXPECT_LE(err, tol) << where << (again ? " (second run)" : "");
      if (again == 0) {
        std::printf("[ max_rel_err ] %s_%s %s %.1e tol %.0e\n", GetParam().name.c_str(),
                    TorchName(dtype).c_str(), c.name.c_str(), err, tol);
      }
    }
    return true;
  }

  std::unique_ptr<ComputeBackend> backend_;
};

TEST_P(ConformanceTest, EveryCaseItRunsMatchesTheReference) {
  // dtype -> ops covered, ops with a case it refused.
  std::map<DataType, std::set<std::string>> covered, refused;
  for (const ConformanceCase& c : ConformanceCases()) {
    for (DataType t : c.dtypes) {
      (Check(c, t) ? covered : refused)[t].insert(c.node.op());
    }
  }
  for (DataType t : {DT_FLOAT32, DT_FLOAT16, DT_BFLOAT16, DT_INT64, DT_INT32, DT_BOOL}) {
    std::vector<std::string> gaps;
    for (const std::string& op : refused[t]) {
      if (covered[t].count(op) == 0) gaps.push_back(op);
    }
    std::printf("[ coverage ] %s %s: %zu ops%s%s\n", GetParam().name.c_str(),
                TorchName(t).c_str(), covered[t].size(), gaps.empty() ? "" : "; refuses ",
                absl::StrJoin(gaps, " ").c_str());
    // On a GPU and with no failure at all, every op whose cases in this
    // dtype all ran: what tools/gpu_check.sh turns into lines of
    // runtime/cuda/gpu_results/confirmed_kernels.txt.
    if (!GetParam().needs_gpu || HasFailure()) continue;
    for (const std::string& op : covered[t]) {
      if (refused[t].count(op) == 0) {
        std::printf("[ confirms ] %s %s\n", op.c_str(), TorchName(t).c_str());
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllBackends, ConformanceTest, ::testing::ValuesIn(Backends()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace pipeserve
