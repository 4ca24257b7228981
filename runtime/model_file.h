// Reading and writing pipeserve model files (`.psm`): a Graph proto header
// followed by raw parameter blobs, so models larger than protobuf's 2 GiB
// message limit work.
//
// Layout (all integers little-endian):
//   offset 0   8 bytes  magic "PIPESRV1"
//   offset 8   uint64   H, the header's byte length
//   offset 16  H bytes  serialized pipeserve.Graph
//   zero padding up to D, the first multiple of 64 at or after 16 + H
//   D + TensorInfo.offset: each stored tensor's bytes (float32, row-major),
//   every offset a multiple of 64; CRC-32 (zlib) recorded per tensor.
//
//   ASSIGN_OR_RETURN(Model m, ReadModelFile("/models/example.psm"));
//   const Tensor& w = m.weights.at("lin1.weight");
#ifndef PIPESERVE_RUNTIME_MODEL_FILE_H_
#define PIPESERVE_RUNTIME_MODEL_FILE_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "proto/model.pb.h"
#include "runtime/tensor.h"

namespace pipeserve {

inline constexpr char kModelMagic[] = "PIPESRV1";

// Parameter and buffer tensors keyed by canonical FQN.
using WeightMap = absl::flat_hash_map<std::string, Tensor>;

struct Model {
  Graph graph;
  WeightMap weights;
};

// Reads and checks a model file: magic, header, and for every TensorInfo
// that its bytes lie inside the file, that byte_size matches dtype and
// shape, and that the CRC-32 matches. Errors: kNotFound (no file),
// kDataLoss (truncated or corrupt, naming the tensor), kInvalidArgument
// (not a model file, or a size that does not match the shape).
absl::StatusOr<Model> ReadModelFile(const std::string& path);

// Same, from bytes already in memory.
absl::StatusOr<Model> ParseModel(const std::string& bytes);

// A model file opened to read its weights piece by piece, for a coordinator
// that streams weights to stage servers without holding the model in
// memory. Open reads only the header and checks every TensorInfo as
// ReadModelFile does except the checksums (the stage servers check those
// as the bytes arrive). Read is thread-safe.
//
//   ASSIGN_OR_RETURN(auto file, ModelFileReader::Open(path));
//   Partition(file->graph(), options);
//   RETURN_IF_ERROR(file->Read("lin1.weight", 0, 4096, buffer));
class ModelFileReader {
 public:
  static absl::StatusOr<std::unique_ptr<ModelFileReader>> Open(const std::string& path);
  ~ModelFileReader();

  const Graph& graph() const { return graph_; }

  // Copies `n` bytes of parameter `fqn` from byte `offset` into `out`.
  // kInvalidArgument for an unknown parameter or a range past its end,
  // kDataLoss when the file cannot be read.
  absl::Status Read(const std::string& fqn, uint64_t offset, size_t n, char* out) const;

 private:
  ModelFileReader() = default;
  int fd_ = -1;
  std::string path_;
  Graph graph_;
  uint64_t data_start_ = 0;
  absl::flat_hash_map<std::string, const TensorInfo*> params_;
};

// Writes `graph` and `weights` in the layout above, filling in each
// TensorInfo's offset, byte_size and crc32 (the TensorInfo list is taken
// from graph.params; each needs a tensor in `weights`). Written to a
// temporary file and renamed, so readers never see half a file.
absl::Status WriteModelFile(const std::string& path, Graph graph,
                            const WeightMap& weights);

// zlib CRC-32 of `n` bytes.
uint32_t Crc32(const void* data, size_t n);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_MODEL_FILE_H_
