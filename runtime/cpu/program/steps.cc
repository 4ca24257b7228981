// CountSlotUses (steps.h): who makes and who reads each value slot of a
// compiled stage.
#include "runtime/cpu/program/steps.h"

namespace pipeserve::cpu_program {

SlotUses CountSlotUses(const CompiledStage& stage) {
  SlotUses u;
  const std::vector<Step>& steps = stage.steps;
  for (size_t i = 0; i < steps.size(); ++i) {
    u.producer[steps[i].out] = static_cast<int>(i);
    if (steps[i].kind == Kind::kSkip) continue;
    for (int v : steps[i].in) ++u.readers[v];
    if (steps[i].mask_cond >= 0) ++u.readers[steps[i].mask_cond];
    if (steps[i].mask_add >= 0) ++u.readers[steps[i].mask_add];
  }
  for (int v : stage.output_slots) ++u.readers[v];
  return u;
}

}  // namespace pipeserve::cpu_program
