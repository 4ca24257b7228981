// Elementwise ops with broadcasting on the GPU, written once against
// simt.h: one kernel runs a small program per output element (loads of up
// to kMaxProgramInputs broadcast inputs, constants, unary functions,
// arithmetic, comparisons, where), so a chain of elementwise ops can be one
// kernel that reads each input once and writes one output. The device plan
// builds the programs (launch_args.h has their format).
#ifndef PIPESERVE_RUNTIME_CUDA_KERNELS_ELEMENTWISE_PROGRAM_H_
#define PIPESERVE_RUNTIME_CUDA_KERNELS_ELEMENTWISE_PROGRAM_H_

#include <cstdint>

#include "runtime/cuda/kernels/elementwise.h"
#include "runtime/cuda/kernels/launch_args.h"
#include "runtime/cuda/simt/simt.h"

namespace pipeserve::kernels {

// a // b as ATen computes it for floats (div_floor_floating).
SIMT_DEVICE float FloorDivide(float a, float b) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  if (b == 0.0f) return a / b;
  const float mod = Fmod(a, b);
  float div = (a - mod) / b;
  if (mod != 0.0f && (b < 0.0f) != (mod < 0.0f)) div -= 1.0f;
  if (div == 0.0f) return CopySign(0.0f, a / b);
  float floor = Floor(div);
  if (div - floor > 0.5f) floor += 1.0f;
  return floor;
}

// a op b as PyTorch computes it in float (maximum and minimum propagate NaN).
SIMT_DEVICE float ApplyBinary(EwCode code, float a, float b) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  switch (code) {
    case EwCode::kAdd: return a + b;
    case EwCode::kSub: return a - b;
    case EwCode::kMul: return a * b;
    case EwCode::kDiv: return a / b;
    case EwCode::kPow: return Pow(a, b);
    case EwCode::kFloorDiv: return FloorDivide(a, b);
    case EwCode::kMaximum: return a != a ? a : b != b ? b : (a > b ? a : b);
    case EwCode::kMinimum: return a != a ? a : b != b ? b : (a < b ? a : b);
    case EwCode::kEq: return a == b ? 1.0f : 0.0f;
    case EwCode::kNe: return a != b ? 1.0f : 0.0f;
    case EwCode::kLt: return a < b ? 1.0f : 0.0f;
    case EwCode::kLe: return a <= b ? 1.0f : 0.0f;
    case EwCode::kGt: return a > b ? 1.0f : 0.0f;
    case EwCode::kGe: return a >= b ? 1.0f : 0.0f;
    default: return 0.0f;
  }
}

// One thread per output element (grid: ProgramBlocks(p.n) of
// kProgramThreads); T is the storage type of float inputs and outputs.
template <typename T>
SIMT_GLOBAL void ElementwiseProgram(ElementwiseProgramOp p, EwPointers at) {
  using namespace simt;  // NOLINT
  const int64_t i = int64_t{BlockIdx().x} * kProgramThreads + ThreadIdx().x;
  if (i >= p.n) return;
  int64_t off[kMaxProgramInputs] = {};
  int64_t rest = i;
  for (int k = p.rank - 1; k >= 0; --k) {
    const int64_t c = rest % p.dims[k];
    rest /= p.dims[k];
    for (int j = 0; j < p.num_inputs; ++j) off[j] += c * p.inputs[j].strides[k];
  }
  float r[kMaxProgramOps];
  for (int s = 0; s < p.num_ops; ++s) {
    const EwInstr& op = p.ops[s];
    switch (op.code) {
      case EwCode::kInput:
        r[s] = p.inputs[op.a].type == EwType::kBool
                   ? static_cast<float>(static_cast<const uint8_t*>(at.in[op.a])[off[op.a]])
                   : ToFloat(static_cast<const T*>(at.in[op.a])[off[op.a]]);
        break;
      case EwCode::kConst: r[s] = op.value; break;
      case EwCode::kUnary: r[s] = ApplyUnary(op.unary, r[op.a]); break;
      case EwCode::kWhere: r[s] = r[op.a] != 0.0f ? r[op.b] : r[op.c]; break;
      default: r[s] = ApplyBinary(op.code, r[op.a], r[op.b]); break;
    }
  }
  const float y = r[p.num_ops - 1];
  if (p.out_type == EwType::kBool) {
    static_cast<uint8_t*>(at.out)[i] = y != 0.0f ? 1 : 0;
  } else {
    static_cast<T*>(at.out)[i] = FromFloat<T>(y);
  }
}

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_ELEMENTWISE_PROGRAM_H_
