// The seed test (PyTorch's test/distributed/pipelining/test_pipe.py) in
// pipeserve terms, and the cases around it: models exported from PyTorch at
// test time, cut by the partitioner, run by LocalPipeline on the CPU
// backend, and compared with PyTorch's own outputs.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "partitioner/partition.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/local_pipeline.h"
#include "tests/compare.h"
#include "tests/fixtures.h"

namespace pipeserve {
namespace {

using ::testing::ElementsAre;
using ::testing::UnorderedElementsAre;

// Every case at batch 16 (the seed's microbatch size), made once.
class SeedTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::string> d = MakeFixtures({}, 16);
    ASSERT_TRUE(d.ok()) << d.status();
    dir_ = new std::string(*d);
  }

  Fixture Load(const std::string& name) {
    absl::StatusOr<Fixture> f = LoadFixture(*dir_, name);
    EXPECT_TRUE(f.ok()) << f.status();
    return f.ok() ? *std::move(f) : Fixture();
  }

  static std::string* dir_;
};

std::string* SeedTest::dir_ = nullptr;

void ExpectBitwiseEqual(const Tensor& a, const Tensor& b) {
  ASSERT_EQ(a.shape(), b.shape());
  for (int64_t i = 0; i < a.numel(); ++i) {
    ASSERT_EQ(a.data()[i], b.data()[i]) << "element " << i;
  }
}

Plan MustPartition(const Graph& g, int num_stages = 0) {
  PartitionOptions o;
  o.num_stages = num_stages;
  absl::StatusOr<Plan> p = Partition(g, o);
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? *p : Plan();
}

std::vector<Tensor> RunPipeline(const Fixture& f, const Plan& plan,
                                int chunks = 1) {
  auto cpu = MakeCpuBackend({});
  LocalPipelineOptions o;
  o.chunks = chunks;
  auto pipe = LocalPipeline::Create(f.model, plan, *cpu, o);
  EXPECT_TRUE(pipe.ok()) << pipe.status();
  if (!pipe.ok()) return {};
  auto out = (*pipe)->Run(f.inputs);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? *out : std::vector<Tensor>();
}

// The unsplit model, one program over the whole graph (markers ignored).
std::vector<Tensor> RunUnsplit(const Fixture& f) {
  auto prog = MakeCpuBackend({})->Compile(f.model.graph, f.model.weights);
  EXPECT_TRUE(prog.ok()) << prog.status();
  if (!prog.ok()) return {};
  auto out = (*prog)->Run(f.inputs);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? *out : std::vector<Tensor>();
}

// The seed's qualname checks, plus the set equality it leaves off.
void ExpectFqnProperties(const Fixture& f, const Plan& plan) {
  std::set<std::string> original(f.model.graph.state_dict_keys().begin(),
                                 f.model.graph.state_dict_keys().end());
  for (const Stage& s : plan.stages()) {
    for (const std::string& fqn : s.param_fqns()) {
      EXPECT_TRUE(original.count(fqn)) << "stage " << s.index() << " holds "
                                       << fqn << ", not an original key";
    }
  }
  std::vector<std::string> covered = CoveredStateDictKeys(f.model.graph, plan);
  std::set<std::string> all(covered.begin(), covered.end());
  all.insert(plan.unused_state_dict_keys().begin(),
             plan.unused_state_dict_keys().end());
  EXPECT_EQ(all, original);
}

// Runs the seed's assertions on one model.
void SeedChecks(const Fixture& f, int expected_stages) {
  Plan plan = MustPartition(f.model.graph);
  ASSERT_EQ(plan.stages_size(), expected_stages);
  std::vector<Tensor> out = RunPipeline(f, plan);
  ASSERT_EQ(out.size(), f.expected.size());
  for (size_t i = 0; i < out.size(); ++i) {
    ExpectMatchesPyTorch(out[i], f.expected[i], f.exact[i]);
  }
  std::vector<Tensor> unsplit = RunUnsplit(f);
  ASSERT_EQ(unsplit.size(), out.size());
  for (size_t i = 0; i < out.size(); ++i) ExpectBitwiseEqual(out[i], unsplit[i]);
  ExpectFqnProperties(f, plan);
}

// The seed's models use every parameter: the stages alone cover the keys.
void ExpectNothingUnused(const Fixture& f) {
  Plan plan = MustPartition(f.model.graph);
  EXPECT_THAT(plan.unused_state_dict_keys(), ::testing::IsEmpty());
}

TEST_F(SeedTest, ExampleCodeHasFourStagesAndMatchesPyTorch) {
  SeedChecks(Load("example_code"), 4);
}

TEST_F(SeedTest, MultiMlpHasFourStagesAndMatchesPyTorch) {
  SeedChecks(Load("multi_mlp"), 4);
}

TEST_F(SeedTest, ModelWithParamAliasHasTwoStagesAndMatchesPyTorch) {
  Fixture f = Load("param_alias");
  SeedChecks(f, 2);
  // Both aliases of each tensor are recorded; one copy is stored.
  EXPECT_EQ(f.model.graph.aliases_size(), 3);  // mm_param0, lin0.weight/bias
  EXPECT_EQ(f.model.graph.params_size(), 3);
}

TEST_F(SeedTest, SeedModelsUseEveryParameter) {
  for (const char* name : {"example_code", "multi_mlp", "param_alias"}) {
    ExpectNothingUnused(Load(name));
  }
}

TEST_F(SeedTest, ExampleCodeMultiUseParameterIsInStagesZeroAndOne) {
  Fixture f = Load("example_code");
  Plan plan = MustPartition(f.model.graph);
  ASSERT_EQ(plan.stages_size(), 4);
  EXPECT_THAT(plan.stages(0).param_fqns(), ElementsAre("mm_param1"));
  EXPECT_THAT(plan.stages(1).param_fqns(),
              UnorderedElementsAre("mm_param1", "lin1.weight", "lin1.bias"));
  // skip_connection: made in stage 0, read in stage 2.
  std::vector<int> sources(plan.stages(2).input_sources().begin(),
                           plan.stages(2).input_sources().end());
  EXPECT_THAT(sources, UnorderedElementsAre(0, 1));
}

TEST_F(SeedTest, SplitSpecOnModuleListMlp) {
  SeedChecks(Load("mlp_list4"), 4);
}

TEST_F(SeedTest, TransformerLikeKeepsChildNamesInEachStage) {
  Fixture f = Load("transformer_like");
  SeedChecks(f, 2);
  Plan plan = MustPartition(f.model.graph);
  for (int s = 0; s < 2; ++s) {
    for (const std::string& fqn : plan.stages(s).param_fqns()) {
      int layer = fqn[std::string("layers.").size()] - '0';
      EXPECT_EQ(layer / 4, s) << fqn << " in stage " << s;
    }
  }
}

TEST_F(SeedTest, RegistryExampleCodeWithBufferAtTwoThreeFourSplits) {
  SeedChecks(Load("cval2"), 2);
  SeedChecks(Load("cval3"), 3);
  // With two splits the model never calls lin1: listed as unused, not lost.
  Plan two = MustPartition(Load("cval2").model.graph);
  EXPECT_THAT(two.unused_state_dict_keys(),
              UnorderedElementsAre("lin1.weight", "lin1.bias"));
  Fixture f = Load("cval4");
  SeedChecks(f, 4);
  Plan plan = MustPartition(f.model.graph);
  EXPECT_THAT(plan.stages(0).param_fqns(),
              ::testing::Contains("cval"));
}

TEST_F(SeedTest, ValueSkippingTwoStages) {
  Fixture f = Load("skip_two");
  SeedChecks(f, 4);
  Plan plan = MustPartition(f.model.graph);
  EXPECT_THAT(plan.stages(3).input_sources(), ::testing::Contains(0));
}

TEST_F(SeedTest, ModelInputUsedOnlyByTheLastStage) {
  Fixture f = Load("late_input");
  Plan plan = MustPartition(f.model.graph);
  SeedChecks(f, plan.stages_size());
  int last = plan.stages_size() - 1;
  EXPECT_THAT(plan.stages(last).input_sources(), ::testing::Contains(-1));
  for (int s = 1; s < last; ++s) {
    EXPECT_THAT(plan.stages(s).input_sources(),
                ::testing::Not(::testing::Contains(-1)));
  }
}

TEST_F(SeedTest, ParameterUsedInThreeStages) {
  Fixture f = Load("param_three");
  Plan plan = MustPartition(f.model.graph);
  SeedChecks(f, plan.stages_size());
  ASSERT_GE(plan.stages_size(), 3);
  std::string shared = plan.stages(0).param_fqns(0);
  for (const Stage& s : plan.stages()) {
    EXPECT_THAT(s.param_fqns(), ::testing::Contains(shared));
  }
}

TEST_F(SeedTest, AutomaticCutIntoThreeStages) {
  Fixture f = Load("no_markers");
  Plan plan = MustPartition(f.model.graph, 3);
  ASSERT_EQ(plan.stages_size(), 3);
  std::vector<Tensor> out = RunPipeline(f, plan);
  ASSERT_EQ(out.size(), 1u);
  ExpectMatchesPyTorch(out[0], f.expected[0], f.exact[0]);
  ExpectFqnProperties(f, plan);
  // Equal layers: each stage holds the same number of parameters.
  EXPECT_EQ(plan.stages(0).param_fqns_size(), plan.stages(2).param_fqns_size());
}

TEST(MicrobatchTest, UnevenBatchThroughFourChunksMatchesPyTorch) {
  absl::StatusOr<std::string> dir = MakeFixtures({"example_code", "multi_mlp"}, 37);
  ASSERT_TRUE(dir.ok()) << dir.status();
  for (const char* name : {"example_code", "multi_mlp"}) {
    absl::StatusOr<Fixture> f = LoadFixture(*dir, name);
    ASSERT_TRUE(f.ok()) << f.status();
    Plan plan = MustPartition(f->model.graph);
    std::vector<Tensor> out = RunPipeline(*f, plan, /*chunks=*/4);
    ASSERT_EQ(out.size(), 1u);
    EXPECT_THAT(out[0].shape(), ElementsAre(37, 512));
    ExpectMatchesPyTorch(out[0], f->expected[0], f->exact[0]);
    // More chunks than rows still works (37 chunks of one row).
    std::vector<Tensor> fine = RunPipeline(*f, plan, /*chunks=*/64);
    ASSERT_EQ(fine.size(), 1u);
    ExpectMatchesPyTorch(fine[0], f->expected[0], f->exact[0]);
  }
}

}  // namespace
}  // namespace pipeserve
