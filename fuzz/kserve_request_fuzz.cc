// Fuzz target: KServe v2 ModelInferRequests as a client may send them,
// checked against a plan with a batched input, a fixed-shape input and two
// outputs: input parsing (names, datatypes, shapes and their byte sizes,
// raw and typed contents, and what an empty tensor may span) and output
// selection.
#include <cstdint>

#include "proto/grpc_service.pb.h"
#include "server/coordinator/kserve_request.h"

namespace {

pipeserve::Plan MakePlan() {
  pipeserve::Plan plan;
  auto* x = plan.add_inputs();
  x->set_name("x");
  x->set_dtype(pipeserve::DT_FLOAT32);
  x->add_shape(-1);
  x->add_shape(4);
  x->set_batched(true);
  auto* bias = plan.add_inputs();
  bias->set_name("bias");
  bias->set_dtype(pipeserve::DT_FLOAT32);
  bias->add_shape(4);
  for (const char* name : {"out", "aux"}) {
    auto* o = plan.add_outputs();
    o->set_name(name);
    o->add_shape(-1);
    o->add_shape(4);
    o->set_batched(true);
  }
  return plan;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const pipeserve::Plan* plan = new pipeserve::Plan(MakePlan());
  inference::ModelInferRequest req;
  if (!req.ParseFromArray(data, static_cast<int>(size))) return 0;
  absl::StatusOr<std::vector<pipeserve::Tensor>> inputs = pipeserve::ParseInferInputs(req, *plan);
  if (inputs.ok()) {
    if (inputs->size() != 2) __builtin_trap();
    for (const pipeserve::Tensor& t : *inputs) {
      // No tensor handed on spans more than data could fill ([2^40, 0]).
      if (pipeserve::ShapeExtent(t.shape()) > pipeserve::kMaxDataExtent) __builtin_trap();
      // Every tensor handed on is fully backed by its bytes.
      volatile float sink = 0;
      for (int64_t i = 0; i < t.numel(); i += 97) sink = sink + t.data()[i];
      (void)sink;
    }
  }
  absl::StatusOr<std::vector<int>> chosen = pipeserve::ChooseOutputs(req, *plan);
  if (chosen.ok()) {
    for (int j : *chosen) {
      if (j < 0 || j >= plan->outputs_size()) __builtin_trap();
    }
  }
  return 0;
}
