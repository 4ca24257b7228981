// Element types: sizes, names and the 16-bit float conversions.
//
//   ElementSize(DT_BFLOAT16)           // 2
//   KServeName(DT_INT64)               // "INT64"
//   ParseKServeName("BF16")            // DT_BFLOAT16
//   float f = Bf16ToFloat(FloatToBf16(1.5f));
#ifndef PIPESERVE_GRAPH_DTYPE_H_
#define PIPESERVE_GRAPH_DTYPE_H_

#include <cstdint>
#include <cstring>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/model.pb.h"

namespace pipeserve {

// Bytes per element; 0 for DT_INVALID and values outside the enum.
int ElementSize(DataType dtype);

// True for the enum's named, valid types (not DT_INVALID).
bool IsValidDataType(int dtype);
bool IsFloatingPoint(DataType dtype);
bool IsInteger(DataType dtype);  // INT64, INT32 (not BOOL)

// KServe v2 datatype strings: "FP32", "FP16", "BF16", "INT64", "INT32",
// "BOOL". ParseKServeName refuses everything else with kInvalidArgument
// naming the string and the supported ones.
std::string KServeName(DataType dtype);
absl::StatusOr<DataType> ParseKServeName(absl::string_view name);

// PyTorch's spelling, for messages: "float32", "bfloat16", "int64", ...
std::string TorchName(DataType dtype);

// bfloat16: the top 16 bits of a float32, rounded to nearest even (NaN
// stays NaN).
inline uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float Bf16ToFloat(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE binary16, rounded to nearest even; overflow becomes infinity.
uint16_t FloatToHalf(float f);
float HalfToFloat(uint16_t h);

}  // namespace pipeserve

#endif  // PIPESERVE_GRAPH_DTYPE_H_
