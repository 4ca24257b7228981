#include "runtime/model_file.h"

#include "graph/dtype.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace pipeserve {
namespace {

constexpr size_t kHeaderStart = 16;

uint64_t AlignUp(uint64_t n) { return (n + 63) / 64 * 64; }

void PutU64(char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

uint64_t GetU64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t{static_cast<uint8_t>(p[i])} << (8 * i);
  return v;
}

// A header this large is not a model's graph (protobuf parses at most 2 GiB).
constexpr uint64_t kMaxHeaderBytes = uint64_t{1} << 30;

// The byte size a TensorInfo's dtype and shape call for.
absl::StatusOr<uint64_t> ExpectedBytes(const TensorInfo& info) {
  if (!IsValidDataType(info.dtype())) {
    return absl::InvalidArgumentError(
        absl::StrCat("parameter \"", info.fqn(), "\": unsupported dtype ",
                     static_cast<int>(info.dtype())));
  }
  absl::StatusOr<uint64_t> bytes = CheckedByteSize(
      Shape(info.shape().begin(), info.shape().end()), ElementSize(info.dtype()));
  if (!bytes.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("parameter \"", info.fqn(), "\": ", bytes.status().message()));
  }
  return *bytes;
}

// Every TensorInfo's size matches its shape and its bytes lie inside a data
// section of `data_bytes`, at a 64-byte-aligned offset; no FQN twice.
absl::Status CheckParamTable(const Graph& graph, uint64_t data_bytes) {
  absl::flat_hash_map<std::string, int> seen;
  for (const TensorInfo& info : graph.params()) {
    ASSIGN_OR_RETURN(uint64_t expected, ExpectedBytes(info));
    if (info.byte_size() != expected) {
      return absl::InvalidArgumentError(absl::StrCat(
          "parameter \"", info.fqn(), "\": byte_size ", info.byte_size(),
          " does not match shape ",
          ShapeToString(Shape(info.shape().begin(), info.shape().end())),
          " (", expected, " bytes of ", TorchName(info.dtype()), ")"));
    }
    if (info.offset() % 64 != 0 || info.offset() > data_bytes ||
        info.byte_size() > data_bytes - info.offset()) {
      return absl::DataLossError(absl::StrCat(
          "parameter \"", info.fqn(), "\": ", info.byte_size(), " bytes at offset ",
          info.offset(), " lie outside the data section of ", data_bytes,
          " bytes (truncated file?)"));
    }
    if (!seen.emplace(info.fqn(), 0).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("parameter \"", info.fqn(), "\" is stored twice"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

uint32_t Crc32(const void* data, size_t n) {
  uLong crc = crc32(0L, Z_NULL, 0);
  const Bytef* p = static_cast<const Bytef*>(data);
  while (n > 0) {
    uInt chunk = static_cast<uInt>(std::min<size_t>(n, 1u << 30));
    crc = crc32(crc, p, chunk);
    p += chunk;
    n -= chunk;
  }
  return static_cast<uint32_t>(crc);
}

namespace {

// Builds a Model from its header bytes and its data section, already in a
// 64-byte-aligned buffer that the weight tensors will share.
absl::StatusOr<Model> FromParts(const char* header, uint64_t header_size,
                                std::shared_ptr<void> data,
                                uint64_t data_bytes) {
  Model model;
  if (!model.graph.ParseFromArray(header, static_cast<int>(header_size))) {
    return absl::DataLossError("model file header is not a valid Graph proto");
  }
  RETURN_IF_ERROR(CheckParamTable(model.graph, data_bytes));
  for (const TensorInfo& info : model.graph.params()) {
    char* p = static_cast<char*>(data.get()) + info.offset();
    uint32_t crc = Crc32(p, info.byte_size());
    if (crc != info.crc32()) {
      return absl::DataLossError(absl::StrCat(
          "parameter \"", info.fqn(), "\": checksum mismatch (stored ",
          info.crc32(), ", computed ", crc, ")"));
    }
    model.weights[info.fqn()] =
        Tensor::Wrap(data, p, Shape(info.shape().begin(), info.shape().end()),
                     info.dtype());
  }
  return model;
}

absl::Status CheckPrefix(const char* prefix, uint64_t total,
                         uint64_t* header_size) {
  if (total < kHeaderStart || std::memcmp(prefix, kModelMagic, 8) != 0) {
    return absl::InvalidArgumentError(
        "not a pipeserve model file (no PIPESRV1 magic)");
  }
  *header_size = GetU64(prefix + 8);
  if (*header_size > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model file header of ", *header_size, " bytes is larger than any graph (1 GiB)"));
  }
  if (*header_size > total - kHeaderStart) {
    return absl::DataLossError(absl::StrCat(
        "model file truncated: header of ", *header_size, " bytes, but only ",
        total - kHeaderStart, " follow"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Model> ParseModel(const std::string& bytes) {
  uint64_t header_size = 0;
  RETURN_IF_ERROR(CheckPrefix(bytes.data(), bytes.size(), &header_size));
  uint64_t data_start = AlignUp(kHeaderStart + header_size);
  uint64_t data_bytes =
      bytes.size() > data_start ? bytes.size() - data_start : 0;
  std::shared_ptr<void> data = TryAllocateAligned(data_bytes);
  if (data == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot allocate ", data_bytes, " bytes for the weights"));
  }
  if (data_bytes > 0) {
    std::memcpy(data.get(), bytes.data() + data_start, data_bytes);
  }
  return FromParts(bytes.data() + kHeaderStart, header_size, std::move(data),
                   data_bytes);
}

absl::StatusOr<Model> ReadModelFile(const std::string& path) {
  auto fail = [&](const absl::Status& s) {
    return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
  };
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot open model file ", path));
  }
  uint64_t total = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  char prefix[kHeaderStart] = {};
  in.read(prefix, std::min<uint64_t>(total, kHeaderStart));
  uint64_t header_size = 0;
  absl::Status s = CheckPrefix(prefix, total, &header_size);
  if (!s.ok()) return fail(s);
  std::string header(header_size, '\0');
  in.read(header.data(), header_size);
  // Weights are read straight into one aligned buffer: no second copy.
  uint64_t data_start = AlignUp(kHeaderStart + header_size);
  uint64_t data_bytes = total > data_start ? total - data_start : 0;
  std::shared_ptr<void> data = TryAllocateAligned(data_bytes);
  if (data == nullptr) {
    return fail(absl::ResourceExhaustedError(
        absl::StrCat("cannot allocate ", data_bytes, " bytes for the weights")));
  }
  in.seekg(data_start);
  in.read(static_cast<char*>(data.get()), data_bytes);
  if (!in) return fail(absl::DataLossError("read error"));
  absl::StatusOr<Model> model =
      FromParts(header.data(), header_size, std::move(data), data_bytes);
  if (!model.ok()) return fail(model.status());
  return model;
}

absl::StatusOr<std::unique_ptr<ModelFileReader>> ModelFileReader::Open(
    const std::string& path) {
  auto fail = [&](const absl::Status& s) {
    return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
  };
  std::unique_ptr<ModelFileReader> r(new ModelFileReader());
  r->path_ = path;
  r->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (r->fd_ < 0) return absl::NotFoundError(absl::StrCat("cannot open model file ", path));
  struct stat st;
  if (::fstat(r->fd_, &st) != 0) return fail(absl::DataLossError("cannot stat the file"));
  const uint64_t total = static_cast<uint64_t>(st.st_size);
  char prefix[kHeaderStart] = {};
  if (total >= kHeaderStart && ::pread(r->fd_, prefix, kHeaderStart, 0) != kHeaderStart) {
    return fail(absl::DataLossError("read error"));
  }
  uint64_t header_size = 0;
  absl::Status s = CheckPrefix(prefix, total, &header_size);
  if (!s.ok()) return fail(s);
  std::string header(header_size, '\0');
  if (header_size > 0 &&
      ::pread(r->fd_, header.data(), header_size, kHeaderStart) != static_cast<ssize_t>(header_size)) {
    return fail(absl::DataLossError("read error"));
  }
  if (!r->graph_.ParseFromString(header)) {
    return fail(absl::DataLossError("model file header is not a valid Graph proto"));
  }
  r->data_start_ = AlignUp(kHeaderStart + header_size);
  uint64_t data_bytes = total > r->data_start_ ? total - r->data_start_ : 0;
  s = CheckParamTable(r->graph_, data_bytes);
  if (!s.ok()) return fail(s);
  for (const TensorInfo& info : r->graph_.params()) r->params_[info.fqn()] = &info;
  return r;
}

ModelFileReader::~ModelFileReader() {
  if (fd_ >= 0) ::close(fd_);
}

absl::Status ModelFileReader::Read(const std::string& fqn, uint64_t offset, size_t n,
                                   char* out) const {
  auto it = params_.find(fqn);
  if (it == params_.end()) {
    return absl::InvalidArgumentError(absl::StrCat("no parameter \"", fqn, "\" in ", path_));
  }
  const TensorInfo& info = *it->second;
  if (offset > info.byte_size() || n > info.byte_size() - offset) {
    return absl::InvalidArgumentError(absl::StrCat("range past the end of \"", fqn, "\""));
  }
  uint64_t at = data_start_ + info.offset() + offset;
  while (n > 0) {
    ssize_t got = ::pread(fd_, out, n, static_cast<off_t>(at));
    if (got <= 0) {
      return absl::DataLossError(absl::StrCat(path_, ": cannot read \"", fqn, "\""));
    }
    out += got;
    at += static_cast<uint64_t>(got);
    n -= static_cast<size_t>(got);
  }
  return absl::OkStatus();
}

absl::Status WriteModelFile(const std::string& path, Graph graph,
                            const WeightMap& weights) {
  uint64_t offset = 0;
  for (TensorInfo& info : *graph.mutable_params()) {
    auto it = weights.find(info.fqn());
    if (it == weights.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("no tensor for parameter \"", info.fqn(), "\""));
    }
    const Tensor& t = it->second;
    info.set_offset(offset);
    info.set_byte_size(t.byte_size());
    info.set_crc32(Crc32(t.data(), t.byte_size()));
    offset = AlignUp(offset + t.byte_size());
  }
  std::string header;
  if (!graph.SerializeToString(&header)) {
    return absl::InternalError("cannot serialize the model graph");
  }
  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return absl::UnavailableError(absl::StrCat("cannot write ", tmp));
    char prefix[kHeaderStart];
    std::memcpy(prefix, kModelMagic, 8);
    PutU64(prefix + 8, header.size());
    out.write(prefix, kHeaderStart);
    out.write(header.data(), header.size());
    uint64_t pos = kHeaderStart + header.size();
    const std::string zeros(64, '\0');
    auto pad_to = [&](uint64_t target) {
      out.write(zeros.data(), target - pos);
      pos = target;
    };
    pad_to(AlignUp(pos));
    uint64_t data_start = pos;
    for (const TensorInfo& info : graph.params()) {
      pad_to(data_start + info.offset());
      const Tensor& t = weights.at(info.fqn());
      out.write(reinterpret_cast<const char*>(t.data()), t.byte_size());
      pos += t.byte_size();
    }
    if (!out) return absl::UnavailableError(absl::StrCat("short write to ", tmp));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::UnavailableError(absl::StrCat("cannot rename ", tmp, " to ", path));
  }
  return absl::OkStatus();
}

}  // namespace pipeserve
