// Lowering a stage graph to flat device work, with no device in sight: the
// CUDA backend (cuda_backend.cc) executes what this module decides, and the
// device emulator (device_emulator.h) executes the same plans on the CPU, so
// every layout, fusion and dtype decision is tested on machines without a
// GPU.
//
//   ASSIGN_OR_RETURN(LoweredStage stage,
//                    LoweredStage::Create(graph, weights, Precision::kBF16));
//   std::vector<char> w(stage.weight_bytes());
//   stage.FillWeights(w.data());            // upload once
//   ASSIGN_OR_RETURN(DevicePlan plan, stage.Plan({{16, 512}, {16, 512}}));
//   StageInputs(plan, inputs, staging_in);  // host -> pinned
//   for (const DeviceOp& op : plan.ops) ... // run on the device
//   UnstageOutputs(plan, staging_out, &outputs);
//
// Decisions made here:
// - `identity` and a ReLU fused into the linear before it (when the relu is
//   the linear output's only reader) are aliases: no work.
// - GEMMs are written in cuBLAS's column-major terms: row-major Y [M, N] is
//   column-major Y^T [N, M], so `x @ w` (mm, w [K, N]) is D = w · x with no
//   transposes and `x @ w^T` (linear, w [N, K]) is D = op_T(w) · x; bias and
//   ReLU are GEMM epilogues.
// - In bf16 and tf32 modes every GEMM operand has a GEMM form (bfloat16, or
//   float32 rounded to nearest TF32): weights converted once, inputs read
//   only by GEMMs converted on the host while staging (for bf16 also half
//   the bytes to copy), other values by a conversion op; in bf16 a GEMM
//   whose output only feeds other GEMMs (and has no bias) writes bfloat16
//   directly. Elementwise ops and outputs are float32 in every mode.
// - Every buffer sits at a 256-byte aligned offset of one of four arenas.
#ifndef PIPESERVE_RUNTIME_CUDA_DEVICE_PLAN_H_
#define PIPESERVE_RUNTIME_CUDA_DEVICE_PLAN_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "graph/validate.h"
#include "proto/model.pb.h"
#include "runtime/cuda/step_pattern.h"
#include "runtime/cuda/broadcast_index.h"
#include "runtime/cuda/kernel_gate.h"
#include "runtime/cuda/kernels/launch_args.h"
#include "runtime/cuda/kernels/unary_kind.h"
#include "runtime/model_file.h"
#include "runtime/precision.h"
#include "runtime/tensor.h"

namespace pipeserve {

class ProgramBuilder;  // elementwise_lowering.h

// kTF32 is float32 storage whose low 13 mantissa bits are zero (rounded to
// nearest even): TF32 GEMM operands, so the tensor cores' treatment of the
// bits they ignore cannot change results.
// kF16: float16, the storage of a float16 graph's values.
enum class DType { kF32, kBF16, kTF32, kF16 };
inline int64_t DTypeBytes(DType t) { return t == DType::kBF16 || t == DType::kF16 ? 2 : 4; }
// The DType a graph value of float type `t` is stored in on the device.
inline DType StorageOf(DataType t) {
  return t == DT_BFLOAT16 ? DType::kBF16 : t == DT_FLOAT16 ? DType::kF16 : DType::kF32;
}

inline constexpr int64_t kArenaAlignment = 256;

enum class Arena {
  kWeights,      // device: parameters, written once by Compile
  kActivations,  // device: inputs, intermediates, outputs of one plan
  kStagingIn,    // pinned host: inputs on their way to the device
  kStagingOut,   // pinned host: outputs on their way back
  kCache,        // device: the KV cache of the stage's cached_attention layers,
                 // kept across runs (cache_bytes(); zeroed once)
};

struct BufferRef {
  Arena arena = Arena::kActivations;
  int64_t offset = 0;  // bytes, a multiple of kArenaAlignment
};

// D = op(A) · B (+ bias per row of D) (then max(., 0)), all column-major:
// op(A) is [m, k] (A is [k, m] with lda when trans_a, else [m, k]), B is
// [k, n] with ldb, D is [m, n] with ldd. Batched (batch > 1): GEMM i reads
// A + i * stride_a (0: one A for all), B + i * stride_b and writes
// D + i * stride_d (strides in elements).
struct GemmOp {
  bool trans_a = false;
  int64_t m = 0, n = 0, k = 0;
  BufferRef a, b, d;
  int64_t lda = 0, ldb = 0, ldd = 0;
  DType ab_type = DType::kF32;  // A and B
  DType d_type = DType::kF32;
  Precision precision = Precision::kFloat32;
  bool has_bias = false;
  BufferRef bias;  // [m], of bias_type
  DType bias_type = DType::kF32;
  bool relu = false;
  // GELU, tanh-approximated (after the bias): cuBLASLt's GELU epilogue,
  // which PyTorch also takes for gelu(approximate="tanh").
  bool gelu = false;
  int64_t batch = 1;
  int64_t stride_a = 0, stride_b = 0, stride_d = 0;
};

enum class ElementwiseOp { kAdd, kSub, kMul };

struct DeviceOp {
  enum class Type {
    kCopyIn,   // bytes: staging_in src -> device dst
    kConvert,  // n floats at src -> n values of dtype (bf16 or tf32) at dst
    kGemm,     // gemm
    kFill,     // a GEMM with k == 0: D = bias or 0 (then ReLU), gemm.d/m/n/ldd
    kBinary,   // dst[i] = src[ia] op src2[ib] over n outputs (index)
    kScalar,   // dst = src op scalar, or scalar op src when reverse
    kRelu,     // dst = max(src, 0)
    kLayerNorm,  // dst [rows, cols] = layer_norm(src) * src2 + src3 (kernels/layer_norm.h)
    kUnary,      // dst = f(src) over n, f = unary (kernels/elementwise.h)
    kSoftmax,    // dst [rows, cols] = softmax(src) over cols, log_softmax when `log`
    kStridedCopy,  // dst = src moved as `copy` says (kernels/strided_copy.h)
    kProgram,      // dst = `program` of src, src2, src3 (kernels/elementwise_program.h)
    kEmbedding,    // dst [n, cols] = rows of table src2 [rows, cols] at int64 ids src [n]
    kReduce,       // dst = `reduce` of src (kernels/reduction.h)
    kTriangle,     // dst = src with entries off the triangle zeroed (kernels/triangle.h)
    kAttention,    // cached_attention: KvAppend then PagedAttention (kernels/paged_attention.h)
    kCast,         // dst = src converted from cast_from to cast_to (kernels/cast.h)
    kSample,       // dst [rows] int64 = sample_tokens' picks from logits src [rows, cols] (kernels/sample.h)
    kRmsNorm,      // dst [rows, cols] = src * rsqrt(mean(src^2) + eps) * src2 (kernels/layer_norm.h)
    kRotary,       // dst = src * src2 + rotate_half(src) * src3 (kernels/rotary.h)
    kCopy,     // bytes: device src -> device dst (clone)
    kCopyOut,  // bytes: device src -> staging_out dst
  };
  Type type;
  std::string node;  // the graph node it comes from, for errors
  BufferRef src, src2, dst;
  int64_t n = 0;      // elements
  int64_t bytes = 0;  // copies
  GemmOp gemm;
  ElementwiseOp op = ElementwiseOp::kAdd;
  BroadcastIndex index;
  float scalar = 0;
  bool reverse = false;
  DType dtype = DType::kBF16;  // kConvert's target
  // kLayerNorm: src3 the bias; the weight (src2) and bias are optional
  // (kRmsNorm: the weight, optional). Either norm, has_residual: the
  // norm is of src + src4, which it also writes to residual_sum (the
  // residual add before the norm, fused: FuseResidualNorms).
  // kProgram: src, src2, src3, src4 its inputs.
  BufferRef src3, src4;
  int64_t rows = 0, cols = 0;
  float eps = 0;
  bool has_weight = false, has_bias = false, has_residual = false;
  BufferRef residual_sum;
  kernels::UnaryKind unary = kernels::UnaryKind::kNone;  // kUnary
  bool log = false;                                      // kSoftmax
  kernels::StridedCopyOp copy;                           // kStridedCopy
  kernels::ElementwiseProgramOp program;                 // kProgram
  int64_t element_bytes = 4;                             // kStridedCopy, kTriangle
  kernels::ReduceOp reduce;                              // kReduce
  kernels::RotaryOp rotary;                              // kRotary
  int64_t diagonal = 0;                                  // kTriangle (rows, cols)
  bool upper = false;
  // kAttention: q src, k src2, v src3, positions src4 (all [1, H|Hkv, T, D]
  // float32 and int64 metadata); `paged` without its pointers (the
  // launcher sets them from the buffers); tiles: num_tiles * Buffers::tile
  // token indices (int32); cache: the layer's blocks; scale in `scalar`.
  BufferRef seq, tables, tiles, cache;
  kernels::PagedCache paged;
  int heads = 0;
  int64_t num_tiles = 0;
  // TensorCoreAttention on tiles of kTcQueryTile tokens, else
  // PagedAttention on tiles of kQueryTile / group (Buffers::tile).
  bool tensor_cores = false;
  // PagedAttention's blocks (kernels::AttentionBlocks): `group` query
  // heads of a KV group a block, and its keys split over `splits` blocks,
  // their rows in `partials` (floats) until CombineSplits merges them.
  int group = 1;
  int splits = 1;
  BufferRef partials;
  // The tables of a rotary embedding folded into the attention's reads of
  // q and k (FuseRotaryIntoAttention; paged.rope_q/rope_k hold its sizes,
  // the launcher its pointers).
  struct RopeTables {
    bool on = false;
    BufferRef cos, sin;
  };
  RopeTables rope_q, rope_k;
  DataType cast_from = DT_FLOAT32, cast_to = DT_FLOAT32;  // kCast
  // kSample: the sampling parameters, contexts and context ends (graph
  // inputs, checked by the host first: CheckSampleInputs), and rows * cols
  // doubles of scratch (kernels::SampleArgs).
  struct SampleBuffers {
    BufferRef floats, ints, context, ends, scratch;
  };
  SampleBuffers sample;
  // Kernels over float values: their storage (float32, float16, bfloat16).
  DataType ftype = DT_FLOAT32;
};

// A kSample op's kernel arguments, `at` giving a buffer's address (the
// device's, or the emulator's host memory).
template <typename At>
kernels::SampleArgs SampleArgsOf(const DeviceOp& op, At at) {
  kernels::SampleArgs a;
  a.floats = reinterpret_cast<const float*>(at(op.sample.floats));
  a.ints = reinterpret_cast<const int64_t*>(at(op.sample.ints));
  a.context = reinterpret_cast<const int64_t*>(at(op.sample.context));
  a.ends = reinterpret_cast<const int64_t*>(at(op.sample.ends));
  a.scratch = reinterpret_cast<double*>(at(op.sample.scratch));
  a.out = reinterpret_cast<int64_t*>(at(op.dst));
  a.cols = op.cols;
  return a;
}

// Host side of one input or output.
struct StagedValue {
  int index = 0;  // graph input or output number
  BufferRef staging;
  DType type =
      DType::kF32;  // inputs: the GEMM form when converted while staging
  Shape shape;
  DataType dtype = DT_FLOAT32;  // int64 and bool values go as they are
};

// A value the plan computed on the host (arange, full), staged with the
// inputs.
struct StagedConstant {
  BufferRef staging;
  Tensor value;
};

// The attention tiles of a step (AttentionTiles of graph input
// `seq_input`, `tile` tokens each), written by StageInputs: `capacity`
// tiles, spare ones -1.
struct StagedTiles {
  BufferRef staging;
  int seq_input = 0;
  int64_t capacity = 0;
  int tile = kernels::kQueryTile;
};

// sample_tokens' parameters (graph inputs floats, ints, context, ends),
// which the host checks before a run as the CPU's sample_tokens checks
// them (CheckSampleInputs, device_generation.h) over logits of `vocab`.
struct SampleCheck {
  std::string node;
  int floats = -1, ints = -1, context = -1, ends = -1;
  int64_t vocab = 0;
};

// The checks a cached_attention stage makes on the host before a step
// (KvCache::BeginStep, runtime/cpu/kv_cache.h): graph inputs holding
// positions, seq, blocks and seq_ids, and the step's token count.
struct KvInputs {
  int positions = -1, seq = -1, blocks = -1, seq_ids = -1;
  int64_t tokens = 0;
};

// Ids an embedding reads straight from graph input `input`: each must be
// in [0, rows) (CheckIndices).
struct IndexCheck {
  int input = 0;
  int64_t rows = 0;
  std::string node;
};

// Everything one run does for one set of input shapes.
struct DevicePlan {
  std::vector<Shape> input_shapes;
  int64_t activation_bytes = 0, staging_in_bytes = 0, staging_out_bytes = 0;
  std::vector<StagedValue> inputs;   // host tensor -> staging_in
  std::vector<StagedValue> outputs;  // staging_out -> host tensor
  std::vector<StagedConstant> constants;  // -> staging_in, after the inputs
  std::vector<IndexCheck> index_checks;
  std::vector<StagedTiles> tiles;         // -> staging_in, after the constants
  std::vector<SampleCheck> sample_checks;
  KvInputs kv;                            // positions < 0: the stage has no cache
  // kCopyIn ops first, then compute in graph order, then kCopyOut ops;
  // ops [compute_begin, compute_end) are the compute.
  std::vector<DeviceOp> ops;
  size_t compute_begin = 0, compute_end = 0;
};

class LoweredStage {
 public:
  // Validates `graph`, resolves aliases and fusions, chooses every value's
  // dtypes and lays out the weights arena. Errors: kInvalidArgument (invalid
  // graph, an op without a device kernel or, with CudaOps::kConfirmed,
  // without one a GPU has confirmed (kernel_gate.h), a parameter missing
  // from `weights`). The stage keeps shallow references to the weights
  // until ReleaseWeights().
  static absl::StatusOr<LoweredStage> Create(const Graph& graph,
                                             const WeightMap& weights,
                                             Precision precision,
                                             bool fuse_linear_relu = true,
                                             CudaOps cuda_ops = CudaOps::kConfirmed);

  const Graph& graph() const { return graph_; }
  Precision precision() const { return precision_; }
  int64_t weight_bytes() const { return weight_bytes_; }
  // Linear layers whose ReLU became their GEMM's epilogue.
  int fused_relus() const { return fused_relus_; }

  // The KV cache of the stage's cached_attention layers (none: no layers):
  // num_blocks blocks of block_size tokens per layer, each layer's kv_heads
  // and head_dim; cache_bytes() of device memory (Arena::kCache).
  struct CacheLayer {
    int kv_heads = 0, head_dim = 0;
    int64_t offset = 0;  // in the cache arena
    DataType type = DT_FLOAT32;  // keys' and values' storage: the graph's float type
  };
  const std::vector<CacheLayer>& cache_layers() const { return cache_layers_; }
  int64_t num_blocks() const { return num_blocks_; }
  int block_size() const { return block_size_; }
  int64_t cache_bytes() const { return cache_bytes_; }

  // Writes the weights arena (weight_bytes() bytes): float32 and GEMM-form
  // copies of the parameters, as the plans read them.
  void FillWeights(void* dst) const;
  // Drops the host weight references (after the arena is on the device).
  void ReleaseWeights();

  // The plan for concrete input shapes (graph input order, already checked
  // against the graph's signature). kInvalidArgument naming the node whose
  // shape rule fails; kUnimplemented for a broadcast the kernels cannot
  // index.
  absl::StatusOr<DevicePlan> Plan(const std::vector<Shape>& input_shapes) const;

 private:
  enum class Kind {
    kMm, kLinear, kBinary, kScalar, kRelu, kClone, kLayerNorm, kUnary, kSoftmax,
    kView,  // reshape, squeeze, unsqueeze: the input's buffers (view_of),
            // no work; also a GELU its GEMM computes (FuseGeluEpilogues)
    kMove,  // permute, slice, select, expand, cat, stack: strided copies
    kSize,  // size: an integer known on the host when the plan is made
    kConstant,   // arange, full: computed on the host when the plan is made
    kProgram,    // div, pow, maximum, minimum, comparisons, where
    kEmbedding,  // int64 ids into a float32 table
    kAddmm,      // bias [N] + x @ w: a GEMM with a bias epilogue
    kReduce,     // sum, mean, amax
    kTriangle,   // triu, tril
    kAttention,  // cached_attention, on the stage's device KV cache
    kSample,     // sample_tokens: only the picks come back
    kCast,       // float32, int64 and bool to one another
    kRmsNorm,    // RMSNorm written out (FuseRmsNorms): kernel_in x and, maybe, the weight
    kRotary,     // rotary embedding written out (FuseRotaries): kernel_in x, cos, sin
    kAbsorbed,   // a step a pattern folded into its root (kRmsNorm, kRotary): no work
    kResidualSum,  // an add whose sum the norm after it computes and writes
                   // (FuseResidualNorms): no work, but its value has a buffer
  };
  struct Value {
    int input = -1;     // graph input number, or -1
    int param = -1;     // index into params_, or -1
    int producer = -1;  // step index, or -1
    int alias = -1;     // this id is another's (identity, fused relu)
    int view_of = -1;   // a kView step's output: its input's buffers
    bool host = false;  // a kSize step's output: no buffer
    DataType type = DT_FLOAT32;  // float32, int64 or bool
    bool need_f32 = false, need_gemm = false;  // GEMM form: gemm_type_
    int64_t w_f32 = -1, w_gemm = -1;           // weights arena offsets (params)
  };
  struct Step {
    Kind kind;
    int node;  // index into graph_.nodes()
    std::vector<int> in;
    int out = -1;
    bool relu = false;  // linear: fused ReLU epilogue
    bool gelu = false;  // GEMMs: fused GELU (tanh) epilogue
    ElementwiseOp op = ElementwiseOp::kAdd;
    float scalar = 0;
    bool reverse = false;
    kernels::UnaryKind unary = kernels::UnaryKind::kNone;
    // An elementwise step whose only reader is elementwise: computed inside
    // that step's program (FuseElementwise), not on its own.
    int fused_into = -1;
    int layer = -1;  // kAttention: its cache layer
    // kRmsNorm, kRotary: what the pattern's kernel reads (`in` stays its
    // node's, which its shape rule reads).
    std::vector<int> kernel_in;
    // kRmsNorm, kLayerNorm with the residual add before them fused in: the
    // norm is of kernel_in[0] + `residual`, and its kernel writes that sum
    // to value `residual_sum` (a kResidualSum step's output).
    int residual = -1, residual_sum = -1;
    // kResidualSum: the norm step that computes it, and the step's kind
    // before (it runs as that when the plan's shapes broadcast: ResidualFits).
    int norm = -1;
    Kind unfused = Kind::kBinary;
    // kAttention: the absorbed kRotary steps whose rotation of q and k the
    // attention kernels apply as they read (kernel_in holds the unrotated
    // q and k, then each rotary's cos and sin).
    int rope_q = -1, rope_k = -1;
    // kLinear steps reading one x with weights of one shape (Llama's k and
    // v projections, gate and up; q, k and v with as many KV heads as
    // heads) run as one strided-batched GEMM (FormGemmGroups): the head
    // lists the members, whose weights and outputs are laid out evenly
    // spaced after its own; a member names its head.
    std::vector<int> group;
    int group_head = -1;
  };

  LoweredStage() = default;
  // Plan's parts. Each value's buffers: float32 (f32) and the GEMM form
  // (gm: bfloat16, or float32 rounded to TF32) where the precision has one.
  struct Buffers {
    std::vector<BufferRef> f32, gm;
    std::vector<bool> has_f32, has_gm;
    // A permute's output that is its input's buffers, at these shapes
    // (OrderKeepingPermuteInput): no copy.
    std::vector<bool> aliased;
    BufferRef tiles;  // cached_attention's tiles (int32), num_tiles of them
    int64_t num_tiles = 0;
    int tile = kernels::kQueryTile;  // tokens a tile
    bool tensor_cores = false;       // TensorCoreAttention (TensorCoreTiles)
    int group = 1;                   // PagedAttention's heads a block (AttentionGroupOf)
    BufferRef partials;  // cached_attention's split rows, for the step that needs most
    std::vector<BufferRef> scratch;  // by value: sample_tokens' penalised logits (doubles)
    // By value: a GEMM group's outputs, when the group runs as one batched
    // GEMM at these shapes (GroupFits), its strides in elements; 0 if not.
    struct GroupStrides {
      int64_t a = 0, d = 0;
    };
    std::vector<GroupStrides> batched;
    int64_t activation_bytes = 0;
  };
  // Every value's shape for these inputs, and every step's node with its
  // "_from" attributes taken from the sizes (host integers) they name.
  struct Sizes {
    std::vector<Shape> shape;
    std::vector<Node> node;  // by step
  };
  // kInvalidArgument naming a node whose shape rule fails.
  absl::StatusOr<Sizes> ShapesFor(const std::vector<Shape>& input_shapes) const;
  Buffers LayOutBuffers(const std::vector<Shape>& shape) const;
  // A view's, an aliased permute's or a parameter's buffers (value v): no
  // new ones. False for a value that needs its own.
  bool BuffersElsewhere(int v, const std::vector<Shape>& shape, Buffers* b) const;
  void InputOps(const std::vector<Shape>& shape, const Buffers& b, DevicePlan* plan,
                std::vector<DeviceOp>* copy_in, std::vector<DeviceOp>* compute) const;
  // Step i's ops (its node resolved in sizes.node[i]).
  absl::Status StepOps(size_t i, const Sizes& sizes, const Buffers& b,
                       std::vector<DeviceOp>* compute) const;
  absl::Status StepKernelOps(const Step& s, const Node& node, const Sizes& sizes,
                             const Buffers& b, std::vector<DeviceOp>* compute) const;
  absl::StatusOr<DeviceOp> OneOp(const Step& s, const Node& node, const std::vector<Shape>& shape,
                                 const Buffers& b, BufferRef out) const;
  absl::StatusOr<DeviceOp> ReduceOrTriangleOp(const Step& s, const Node& node, const Shape& x,
                                              DeviceOp op) const;
  // The ops of kProgram, kEmbedding and kConstant steps.
  absl::Status ProgramOps(const Step& s, const Sizes& sizes, const Buffers& b, BufferRef out,
                          std::vector<DeviceOp>* compute) const;
  DeviceOp EmbeddingOp(const Step& s, const std::vector<Shape>& shape, const Buffers& b,
                       BufferRef out) const;
  void ConstantOps(const Sizes& sizes, const Buffers& b, DevicePlan* plan,
                   std::vector<DeviceOp>* copy_in) const;
  // Index checks of embeddings that read graph inputs.
  void IndexChecks(const std::vector<Shape>& shape, DevicePlan* plan) const;
  // cached_attention: the tiles staged after the constants, each layer's op.
  void TileOps(const std::vector<Shape>& shape, const Buffers& b, DevicePlan* plan,
               std::vector<DeviceOp>* copy_in) const;
  // Whether this step's attention runs on tensor cores: a 16-bit cache
  // whose every layer's head_dim TensorCoreAttention takes, and more
  // tokens than sequences (a prefill chunk; a decode step's one token a
  // sequence would fill a 32-row tile with one).
  bool TensorCoreTiles(const std::vector<Shape>& shape) const;
  // The query heads of a KV group PagedAttention's blocks take
  // (kernels::AttentionGroup) when every attention step has the same, else
  // 1: the tiles are the plan's.
  int AttentionGroupOf(const std::vector<Shape>& shape) const;
  // The splits of attention step s's keys (kernels::AttentionSplits): its
  // blocks against the keys its block tables can hold.
  int AttentionSplitsOf(const Step& s, const std::vector<Shape>& shape, const Buffers& b) const;
  // Floats of split rows the plan's attention steps need at most.
  int64_t AttentionPartialFloats(const std::vector<Shape>& shape, const Buffers& b) const;
  absl::StatusOr<DeviceOp> AttentionOp(const Step& s, const Node& node,
                                       const std::vector<Shape>& shape, const Buffers& b,
                                       BufferRef out) const;
  // sample_tokens: the picks on the device, the host's checks before.
  DeviceOp SampleOp(const Step& s, const Node& node, const std::vector<Shape>& shape,
                    const Buffers& b, BufferRef out) const;
  void SampleChecks(const Sizes& sizes, DevicePlan* plan) const;
  // The graph input value `v` is (through identities and views), or -1.
  int GraphInputOf(int v) const;
  // Whether value v is a kSample step's picks (no step on the device reads them).
  bool IsSampled(int v) const;
  // cached_attention's and sample_tokens' requirements (MakeSteps).
  absl::Status CheckAttention(const Node& node, Step* step);
  absl::Status CheckSample(const Node& node, const Step& step) const;
  // The strided copies of a kMove step.
  absl::Status MoveOps(const Step& s, const Node& node, const std::vector<Shape>& shape,
                       const Buffers& b, BufferRef out, std::vector<DeviceOp>* compute) const;
  absl::Status BinaryOps(const Step& s, const std::vector<Shape>& shape, const Buffers& b,
                         BufferRef out, std::vector<DeviceOp>* compute) const;
  // The conversion of n float32 values to their GEMM form.
  DeviceOp ConvertOp(const std::string& node, BufferRef f32, BufferRef gm, int64_t n) const;
  DeviceOp SoftmaxOp(const Step& s, const Shape& x, const std::vector<BufferRef>& f32,
                     BufferRef out) const;
  absl::Status GemmOps(const Step& s, const std::vector<Shape>& shape, const Buffers& b,
                       BufferRef out, std::vector<DeviceOp>* compute) const;
  GemmOp GemmShape(const Step& s, const std::vector<Shape>& shape, int xi) const;
  void FillOps(const std::string& name, const GemmOp& g, BufferRef out,
               std::vector<DeviceOp>* compute) const;
  // kUnimplemented for operands the GEMMs cannot take (x is input xi).
  absl::Status CheckGemmOperands(const Node& node, const std::vector<Shape>& shape, const Step& s,
                                 int xi, int64_t n) const;
  void OutputOps(const std::vector<Shape>& shape, const Buffers& b, DevicePlan* plan,
                 std::vector<DeviceOp>* copy_out) const;
  // The kLayerNorm op of step `s` on x of shape `x`.
  DeviceOp LayerNormOp(const Step& s, const Shape& x, const std::vector<BufferRef>& f32,
                       BufferRef out) const;
  // Value ids by name (identity outputs share their input's; one per
  // parameter), and how many steps or outputs read each id.
  struct ValueIds {
    absl::flat_hash_map<std::string, int> id;
    absl::flat_hash_map<int, int> readers;
  };
  // Marks chains of elementwise steps for fusion into one program kernel
  // (only with CudaOps::kUnconfirmed: the program kernel is not what a GPU
  // confirmed add, sub, mul and relu with).
  bool Bf16OnlyGemmOutput(int v) const;
  int OrderKeepingPermuteInput(int v, const std::vector<Shape>& shape) const;
  bool AliasPermute(int v, const std::vector<Shape>& shape, Buffers* b) const;
  void FuseElementwise();
  // Groups kLinear steps for one batched GEMM (after MarkNeeds: members'
  // outputs need the same forms).
  void FormGemmGroups();
  // Whether `head`'s group runs batched at these shapes and this layout:
  // K > 0 (a GEMM over K = 0 is a fill of one output), every member's
  // weight and output evenly spaced after the head's, in one form (as
  // LayOutWeights and LayOutBuffers lay them out; checked once a plan, by
  // MarkBatched). Its strides (elements) when it does, zeros when not.
  Buffers::GroupStrides GroupFits(const Step& head, const std::vector<Shape>& shape,
                                  const Buffers& b) const;
  // Sets b->batched for every group's outputs (GroupFits).
  void MarkBatched(const std::vector<Shape>& shape, Buffers* b) const;
  // The values of the GEMM groups' steps that `of` picks (a weight or an
  // output): members_of[v], for a head's value v, its members' values;
  // member[v] true for those, which are laid out with their head's.
  struct GroupValues {
    std::vector<std::vector<int>> members_of;
    std::vector<bool> member;
  };
  template <typename Of>
  GroupValues GroupValuesBy(Of of) const;
  // Takes `take(v)` for value v and, when v is a group head's weight or
  // output, for its members' at once (evenly spaced).
  template <typename F>
  void WithGroupMembers(int v, const GroupValues& groups, F take) const;
  // GELU (tanh), as one op or written out as GPT-2 has it, on a GEMM's
  // output becomes that GEMM's epilogue.
  void FuseGeluEpilogues();
  // The GEMM step whose output value `x` is (through views each read only
  // by the next), or -1.
  int GemmBehind(int x, const std::vector<int>& uses) const;
  // Whether step `root` ends GELU written out on x (0.5 * x * (1 +
  // tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))); its other steps.
  bool GeluWrittenOut(int root, const StepView& view, int* x, std::vector<int>* absorbed) const;
  // How many steps (and outputs, as 2) read each value.
  std::vector<int> Uses() const;
  void FuseRmsNorms(const ValueShapes& shapes);
  // An RMSNorm rooted at a step: its steps, x, the weight (-1: none), eps.
  struct RmsNormMatch {
    PatternMatch match;
    int x = -1, weight = -1;
    float eps = 0;
  };
  // The RMSNorm rooted at step r: with its weight, else without one
  // unless r's reader takes it with one.
  std::optional<RmsNormMatch> RmsNormAt(int r, const StepView& view,
                                        const ValueShapes& shapes) const;
  // The RMSNorm `weighted` or not rooted at step r, over the last dim;
  // `weighted`, a weight [D] of x's type.
  std::optional<RmsNormMatch> RmsNormMatchAt(int r, const StepView& view, const ValueShapes& shapes,
                                             bool weighted) const;
  void FuseRotaries(const ValueShapes& shapes);
  // Folds each norm's input add into the norm's kernel (kResidualSum).
  void FuseResidualNorms(const ValueShapes& shapes);
  // Folds a rotary step read only by an attention step, as its q or k,
  // into the attention's kernels.
  void FuseRotaryIntoAttention();
  // The rotary tables and sizes of the attention's q (slot 0) or k.
  absl::Status SetRope(const Step& s, int slot, const std::vector<Shape>& shape, const Buffers& b,
                       DeviceOp* op) const;
  // Whether step `add` is an add the norm at step `norm` can compute: two
  // operands of its output's shape and type, its sum read by no step
  // before the norm.
  bool ResidualAdd(int add, int norm, const ValueShapes& shapes) const;
  // Whether norm step `s`'s fused residual add is x + r of one shape at
  // these shapes (the graph's -1 dims may broadcast when the plan is made).
  bool ResidualFits(const Step& s, const std::vector<Shape>& shape) const;
  // The input buffers and sum of a norm with a fused residual (op.src4,
  // op.residual_sum); where it does not fit, the sum its add wrote as
  // the input.
  void SetResidual(const Step& s, const std::vector<Shape>& shape, const Buffers& b,
                   DeviceOp* op) const;
  // Whether step `add` ends a rotary pattern; its steps and kernel inputs.
  bool RotaryPattern(int add, const StepView& view, const ValueShapes& shapes,
                     std::vector<int>* absorbed, std::vector<int>* kernel_in) const;
  bool Unfused(int i) const;
  // The steps as patterns see them (step_pattern.h): an Unfused step's
  // node, each value's only reader.
  StepView View() const;
  // Each value's only reader (-1: none, several, or an output).
  std::vector<int> OnlyReaders() const;
  DeviceOp RmsNormOpOf(const Step& s, const Node& node, const std::vector<Shape>& shape,
                       const Buffers& b, BufferRef out) const;
  absl::StatusOr<DeviceOp> RotaryOpOf(const Step& s, const Node& node,
                                      const std::vector<Shape>& shape, const Buffers& b,
                                      BufferRef out) const;
  static bool Fusable(const Step& s);
  // The fused programs for these shapes, by their last step; groups whose
  // shapes differ or that overflow a program run op by op instead.
  absl::flat_hash_map<int, DeviceOp> FusedOps(const Sizes& sizes, const Buffers& b) const;
  // The last step of the fused chain step `i` belongs to (i itself when
  // nothing reads it inside a program).
  int RootOf(int i) const;
  bool IsFusedStep(const absl::flat_hash_map<int, DeviceOp>& fused, size_t i) const {
    return fused.contains(RootOf(static_cast<int>(i)));
  }
  // Step `i`'s result in `builder`, its fused inputs computed first (with
  // `fused`; else every input is loaded).
  int EmitFused(int i, const Sizes& sizes, ProgramBuilder* builder, bool fused = true) const;
  // The kProgram op running `builder`'s program into `out`, or
  // kUnimplemented when its inputs mix float types.
  absl::StatusOr<DeviceOp> ProgramOp(const std::string& name, const ProgramBuilder& builder,
                                     DataType ftype, const Buffers& b, BufferRef out) const;
  absl::Status Build(const WeightMap& weights, const ValueTypes& types, const ValueShapes& shapes,
                     bool fuse_linear_relu, CudaOps cuda_ops);
  // Pass 1: values_ (with their types) and their ids.
  absl::Status NumberValues(const WeightMap& weights, const ValueTypes& types, ValueIds* ids);
  static absl::Status CheckParam(const std::string& fqn, const Tensor* w, DataType declared);
  // kInvalidArgument naming the node when a step's kernel does not take
  // its values' types.
  absl::Status CheckTypes(const Node& node, const Step& step) const;
  static absl::Status ChooseKind(const Node& node, Step* step);
  static const absl::flat_hash_map<std::string, Kind>& SimpleKinds();
  // The float type of a step's float values (its output's, or for a
  // comparison its inputs').
  DataType FloatTypeOf(const Step& s) const;
  // kInvalidArgument when `step` computes on a size (a host integer).
  absl::Status CheckSizeReaders(const Node& node, const Step& step) const;
  // Pass 2: steps_, with fused ReLUs; every op's kernel through the gate.
  absl::Status MakeSteps(const ValueIds& ids, bool fuse_linear_relu, CudaOps cuda_ops);
  // The forms each value needs, and the weights arena (GEMM groups'
  // weights evenly spaced, with `group_gemms`).
  void LayOutWeights(bool group_gemms = false);
  // Which forms each value needs (LayOutWeights' first part).
  void MarkNeeds();
  int Canonical(int v) const;
  const Node& NodeOf(const Step& s) const { return graph_.nodes(s.node); }

  Graph graph_;
  Precision precision_ = Precision::kFloat32;
  DType gemm_type_ = DType::kF32;  // GEMM operands' dtype
  std::vector<Value> values_;
  std::vector<Step> steps_;
  std::vector<int> input_values_, output_values_;
  std::vector<Tensor> params_;  // one per param value that is read
  int64_t weight_bytes_ = 0;
  int fused_relus_ = 0;
  std::vector<CacheLayer> cache_layers_;
  int64_t num_blocks_ = 0;
  int block_size_ = 16;
  int64_t cache_bytes_ = 0;
  KvInputs kv_inputs_;  // graph inputs; tokens set per plan
};

// Host float32 <-> bfloat16 is in graph/dtype.h; float32 rounded to TF32 (nearest even; as the CUDA conversion kernel).
float RoundToTf32(float f);
// dst = src as `to` (a copy for kF32).
void ConvertFloats(const float* src, int64_t n, DType to, void* dst);

// Copies `inputs` (graph order) into the staging arena, converting to the
// GEMM form where the plan says, with the plan's constants and attention
// tiles.
void StageInputs(const DevicePlan& plan, absl::Span<const Tensor> inputs,
                 void* staging_in);

// kInvalidArgument naming the node, the id and its index when an
// embedding id in `inputs` is out of its table (plan.index_checks); call
// before StageInputs.
absl::Status CheckIndices(const DevicePlan& plan, absl::Span<const Tensor> inputs);

// Copies the outputs out of the staging arena into `outputs` (resized to
// the graph's outputs; a tensor already there with the right shape and no
// other owner is reused, as the CPU backend reuses its buffers).
void UnstageOutputs(const DevicePlan& plan, const void* staging_out,
                    std::vector<Tensor>* outputs);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CUDA_DEVICE_PLAN_H_
