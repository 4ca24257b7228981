#include "graph/dtype.h"

#include "absl/strings/str_cat.h"

namespace pipeserve {

int ElementSize(DataType dtype) {
  switch (dtype) {
    case DT_FLOAT32:
    case DT_INT32:
      return 4;
    case DT_FLOAT16:
    case DT_BFLOAT16:
      return 2;
    case DT_INT64:
      return 8;
    case DT_BOOL:
      return 1;
    default:
      return 0;
  }
}

bool IsValidDataType(int dtype) {
  return DataType_IsValid(dtype) && dtype != DT_INVALID;
}

bool IsFloatingPoint(DataType dtype) {
  return dtype == DT_FLOAT32 || dtype == DT_FLOAT16 || dtype == DT_BFLOAT16;
}

bool IsInteger(DataType dtype) { return dtype == DT_INT64 || dtype == DT_INT32; }

std::string KServeName(DataType dtype) {
  switch (dtype) {
    case DT_FLOAT32: return "FP32";
    case DT_FLOAT16: return "FP16";
    case DT_BFLOAT16: return "BF16";
    case DT_INT64: return "INT64";
    case DT_INT32: return "INT32";
    case DT_BOOL: return "BOOL";
    default: return absl::StrCat("INVALID(", static_cast<int>(dtype), ")");
  }
}

absl::StatusOr<DataType> ParseKServeName(absl::string_view name) {
  for (DataType t : {DT_FLOAT32, DT_FLOAT16, DT_BFLOAT16, DT_INT64, DT_INT32, DT_BOOL}) {
    if (name == KServeName(t)) return t;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "datatype \"", name, "\" is not supported (supported: FP32, FP16, BF16, INT64, INT32, BOOL)"));
}

std::string TorchName(DataType dtype) {
  switch (dtype) {
    case DT_FLOAT32: return "float32";
    case DT_FLOAT16: return "float16";
    case DT_BFLOAT16: return "bfloat16";
    case DT_INT64: return "int64";
    case DT_INT32: return "int32";
    case DT_BOOL: return "bool";
    default:
      return DataType_IsValid(dtype) ? DataType_Name(dtype)
                                     : absl::StrCat("DataType ", static_cast<int>(dtype));
  }
}

uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // inf / overflow
  if (abs < 0x38800000u) {  // subnormal half (or zero)
    // Scale so the half's subnormal step (2^-24) is one unit, round to even.
    float a;
    std::memcpy(&a, &abs, 4);
    float scaled = a * 16777216.0f;  // 2^24
    uint32_t r = static_cast<uint32_t>(scaled);
    float frac = scaled - static_cast<float>(r);
    if (frac > 0.5f || (frac == 0.5f && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t mant = abs & 0x7fffffu;
  uint32_t exp = (abs >> 23) - 112;  // rebias 127 -> 15
  uint32_t h = (exp << 10) | (mant >> 13);
  uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into exp
  return static_cast<uint16_t>(sign | h);
}

float HalfToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t x;
  if (exp == 0x1f) {
    x = sign | 0x7f800000u | (mant << 13);
  } else if (exp == 0) {
    float v = static_cast<float>(mant) / 16777216.0f;  // mant * 2^-24
    std::memcpy(&x, &v, 4);
    x |= sign;
  } else {
    x = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

}  // namespace pipeserve
