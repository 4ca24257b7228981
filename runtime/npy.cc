#include "runtime/npy.h"

#include <cstring>
#include <fstream>
#include <iterator>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/status_macros.h"

namespace pipeserve {
namespace {

// The text between `key': ` and the next delimiter in the header dict.
absl::string_view Field(absl::string_view header, absl::string_view key) {
  size_t p = header.find(absl::StrCat("'", key, "':"));
  if (p == absl::string_view::npos) return {};
  absl::string_view rest = header.substr(p + key.size() + 3);
  return absl::StripLeadingAsciiWhitespace(rest);
}

// .npy descr strings. numpy has no bfloat16: BF16 tensors are written as
// float32 (WriteNpy) and cannot be read.
struct NpyType {
  const char* descr;
  DataType dtype;
};
constexpr NpyType kNpyTypes[] = {
    {"'<f4'", DT_FLOAT32}, {"'<f2'", DT_FLOAT16}, {"'<i8'", DT_INT64},
    {"'<i4'", DT_INT32},   {"'|b1'", DT_BOOL},
};

}  // namespace

namespace {

// The header dict's text, from the magic and the header length (format
// versions 1 and 2+); sets *data_start to the first byte after it.
absl::StatusOr<absl::string_view> NpyHeader(const std::string& bytes, size_t* data_start) {
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) {
    return absl::InvalidArgumentError("not a .npy file (bad magic)");
  }
  int major = static_cast<uint8_t>(bytes[6]);
  size_t header_len, header_start;
  if (major == 1) {
    header_len = static_cast<uint8_t>(bytes[8]) |
                 (static_cast<size_t>(static_cast<uint8_t>(bytes[9])) << 8);
    header_start = 10;
  } else {
    if (bytes.size() < 12) return absl::DataLossError(".npy header truncated");
    header_len = 0;
    for (int i = 0; i < 4; ++i) {
      header_len |= static_cast<size_t>(static_cast<uint8_t>(bytes[8 + i])) << (8 * i);
    }
    header_start = 12;
  }
  if (header_start + header_len > bytes.size()) {
    return absl::DataLossError(".npy header truncated");
  }
  *data_start = header_start + header_len;
  return absl::string_view(bytes.data() + header_start, header_len);
}

// The header's dtype (one of kNpyTypes), C order.
absl::StatusOr<DataType> NpyDtype(absl::string_view header) {
  absl::string_view descr = Field(header, "descr");
  DataType dtype = DT_INVALID;
  for (const NpyType& t : kNpyTypes) {
    if (absl::StartsWith(descr, t.descr)) dtype = t.dtype;
  }
  if (dtype == DT_INVALID) {
    return absl::InvalidArgumentError(absl::StrCat(
        ".npy dtype ", descr.substr(0, descr.find(',')),
        " is not supported (expected little-endian '<f4', '<f2', '<i8', '<i4' or '|b1')"));
  }
  if (absl::StartsWith(Field(header, "fortran_order"), "True")) {
    return absl::InvalidArgumentError(".npy in Fortran order is not supported");
  }
  return dtype;
}

// The header's shape tuple.
absl::StatusOr<Shape> NpyShape(absl::string_view header) {
  absl::string_view shape_text = Field(header, "shape");
  size_t close = shape_text.find(')');
  if (!absl::ConsumePrefix(&shape_text, "(") || close == absl::string_view::npos) {
    return absl::InvalidArgumentError(".npy header has no shape");
  }
  shape_text = shape_text.substr(0, close - 1);
  Shape shape;
  for (absl::string_view d : absl::StrSplit(shape_text, ',', absl::SkipWhitespace())) {
    int64_t v;
    if (!absl::SimpleAtoi(d, &v) || v < 0) {
      return absl::InvalidArgumentError(absl::StrCat(".npy shape has bad dimension '", d, "'"));
    }
    shape.push_back(v);
  }
  return shape;
}

}  // namespace

absl::StatusOr<Tensor> ParseNpy(const std::string& bytes) {
  size_t data_start = 0;
  ASSIGN_OR_RETURN(absl::string_view header, NpyHeader(bytes, &data_start));
  ASSIGN_OR_RETURN(DataType dtype, NpyDtype(header));
  ASSIGN_OR_RETURN(Shape shape, NpyShape(header));
  absl::StatusOr<uint64_t> checked = CheckedByteSize(shape, ElementSize(dtype));
  if (!checked.ok()) return checked.status();
  if (*checked > bytes.size()) {
    return absl::DataLossError(absl::StrCat(".npy data truncated: ", ShapeToString(shape),
                                            " needs ", *checked, " bytes, the file has ",
                                            bytes.size()));
  }
  Tensor t = Tensor::Empty(shape, dtype);
  if (bytes.size() - data_start < static_cast<size_t>(t.byte_size())) {
    return absl::DataLossError(absl::StrCat(".npy data truncated: ", ShapeToString(shape),
                                            " needs ", t.byte_size(), " bytes, found ",
                                            bytes.size() - data_start));
  }
  if (t.numel() > 0) std::memcpy(t.raw_data(), bytes.data() + data_start, t.byte_size());
  return t;
}

absl::StatusOr<Tensor> ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  absl::StatusOr<Tensor> t = ParseNpy(bytes);
  if (!t.ok()) {
    return absl::Status(t.status().code(), absl::StrCat(path, ": ", t.status().message()));
  }
  return t;
}

absl::Status WriteNpy(const std::string& path, const Tensor& in) {
  Tensor t = in;
  if (t.dtype() == DT_BFLOAT16) {  // numpy has no bfloat16
    t = Tensor::Empty(in.shape());
    for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = Bf16ToFloat(in.data_as<uint16_t>()[i]);
  }
  const char* descr = "'<f4'";
  for (const NpyType& n : kNpyTypes) {
    if (n.dtype == t.dtype()) descr = n.descr;
  }
  std::string shape = absl::StrJoin(t.shape(), ", ");
  if (t.rank() == 1) shape += ",";
  std::string header = absl::StrCat("{'descr': ", descr, ", 'fortran_order': False, 'shape': (",
                                    shape, "), }");
  // Pad with spaces so data starts at a multiple of 64, newline last.
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::UnavailableError(absl::StrCat("cannot write ", path));
  char prefix[10] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0,
                     static_cast<char>(header.size() & 0xff),
                     static_cast<char>(header.size() >> 8)};
  out.write(prefix, 10);
  out.write(header.data(), header.size());
  out.write(static_cast<const char*>(t.raw_data()), t.byte_size());
  if (!out) return absl::UnavailableError(absl::StrCat("short write to ", path));
  return absl::OkStatus();
}

}  // namespace pipeserve
