#include "runtime/cpu/cpu_kernels.h"

#include <dnnl.h>
#include <dnnl.hpp>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <unordered_map>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "graph/shape.h"
#include "runtime/cpu/gemm_amx_bf16.h"
#include "runtime/cpu/gemv_bf16.h"

namespace pipeserve {
namespace {

template <typename F>
void Apply(BinaryOp op, F&& loop) {
  switch (op) {
    case BinaryOp::kAdd:
      loop([](float x, float y) { return x + y; });
      break;
    case BinaryOp::kSub:
      loop([](float x, float y) { return x - y; });
      break;
    case BinaryOp::kMul:
      loop([](float x, float y) { return x * y; });
      break;
  }
}

}  // namespace

void SetComputeThreads(int threads) { omp_set_num_threads(std::max(1, threads)); }

absl::Status Gemm(bool trans_b, int64_t m, int64_t n, int64_t k,
                  const float* a, const float* b, float beta, float* c) {
  if (m == 0 || n == 0) return absl::OkStatus();
  if (k == 0) {
    for (int64_t i = 0; i < m * n; ++i) c[i] = beta == 0.0f ? 0.0f : beta * c[i];
    return absl::OkStatus();
  }
  // oneDNN's sgemm is row-major: lda/ldb/ldc are row lengths.
  dnnl_status_t st = dnnl_sgemm('N', trans_b ? 'T' : 'N', m, n, k, 1.0f, a, k,
                                b, trans_b ? k : n, beta, c, n);
  if (st != dnnl_success) {
    return absl::InternalError(absl::StrCat("dnnl_sgemm(", m, "x", n, "x", k,
                                            ") failed with status ", st));
  }
  return absl::OkStatus();
}

absl::Status LinearForward(const float* x, const float* w, const float* bias,
                           int64_t m, int64_t n, int64_t k, float* y,
                           bool relu, bool w_transposed) {
  float beta = 0.0f;
  if (bias != nullptr) {
    // Start every row of y at the bias and accumulate x @ w^T onto it.
    for (int64_t i = 0; i < m; ++i) std::memcpy(y + i * n, bias, n * 4);
    beta = 1.0f;
  }
  absl::Status s = Gemm(/*trans_b=*/!w_transposed, m, n, k, x, w, beta, y);
  if (!s.ok()) return s;
  if (relu) Relu(y, m * n, y);
  return absl::OkStatus();
}

PIPESERVE_VECTOR_CLONES
void BinaryScalar(BinaryOp op, const float* x, float s, bool reverse,
                  int64_t n, float* out) {
  Apply(op, [&](auto f) {
    if (reverse) {
      for (int64_t i = 0; i < n; ++i) out[i] = f(s, x[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) out[i] = f(x[i], s);
    }
  });
}

PIPESERVE_VECTOR_CLONES
void BinaryBroadcast(BinaryOp op, const float* a,
                     absl::Span<const int64_t> a_shape, const float* b,
                     absl::Span<const int64_t> b_shape, float* out,
                     absl::Span<const int64_t> out_shape) {
  const int rank = static_cast<int>(out_shape.size());
  int64_t total = 1;
  for (int64_t d : out_shape) total *= d;
  if (total == 0) return;
  const std::vector<int64_t> sa = BroadcastStridesIn(a_shape, rank),
                             sb = BroadcastStridesIn(b_shape, rank);
  // The innermost dimension is the fast loop: contiguous (stride 1) or
  // broadcast (stride 0) for each operand.
  const int64_t inner = rank == 0 ? 1 : out_shape[rank - 1];
  const int64_t ia = rank == 0 ? 0 : sa[rank - 1];
  const int64_t ib = rank == 0 ? 0 : sb[rank - 1];
  const int64_t outer = total / inner;
  std::vector<int64_t> idx(std::max(rank - 1, 0), 0);
  Apply(op, [&](auto f) {
    int64_t offa = 0, offb = 0;
    for (int64_t o = 0; o < outer; ++o) {
      float* dst = out + o * inner;
      const float* pa = a + offa;
      const float* pb = b + offb;
      if (ia == 1 && ib == 1) {
        for (int64_t i = 0; i < inner; ++i) dst[i] = f(pa[i], pb[i]);
      } else if (ia == 1 && ib == 0) {
        const float vb = pb[0];
        for (int64_t i = 0; i < inner; ++i) dst[i] = f(pa[i], vb);
      } else if (ia == 0 && ib == 1) {
        const float va = pa[0];
        for (int64_t i = 0; i < inner; ++i) dst[i] = f(va, pb[i]);
      } else {
        for (int64_t i = 0; i < inner; ++i) dst[i] = f(pa[0], pb[0]);
      }
      // Advance the outer index (odometer over dims 0..rank-2).
      for (int d = rank - 2; d >= 0; --d) {
        offa += sa[d];
        offb += sb[d];
        if (++idx[d] < out_shape[d]) break;
        offa -= sa[d] * out_shape[d];
        offb -= sb[d] * out_shape[d];
        idx[d] = 0;
      }
    }
  });
}

namespace {

struct Bf16Key {
  bool trans_b, bias;
  int64_t m, n, k;
  bool operator==(const Bf16Key& o) const {
    return trans_b == o.trans_b && bias == o.bias && m == o.m && n == o.n && k == o.k;
  }
  template <typename H>
  friend H AbslHashValue(H h, const Bf16Key& key) {
    return H::combine(std::move(h), key.trans_b, key.bias, key.m, key.n, key.k);
  }
};

const dnnl::engine& CpuEngine() {
  static const auto* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

}  // namespace

absl::Status GemmBf16(bool trans_b, int64_t m, int64_t n, int64_t k, const uint16_t* a,
                      const uint16_t* b, const uint16_t* bias, uint16_t* c) {
  if (m == 0 || n == 0) return absl::OkStatus();
  if (k == 0) {  // the bias, or zeros, in every row
    for (int64_t i = 0; i < m * n; ++i) c[i] = bias != nullptr ? bias[i % n] : 0;
    return absl::OkStatus();
  }
  if (trans_b && GemvBf16Runs(m)) {  // a decode step: stream the weights once
    GemvBf16(m, n, k, a, b, bias, c);
    return absl::OkStatus();
  }
  if (trans_b && AmxBf16Runs(m, k)) {  // one of many sequences: the same, on AMX tiles
    GemmAmxBf16(m, n, k, a, b, bias, c);
    return absl::OkStatus();
  }
  using dt = dnnl::memory::data_type;
  using dims = dnnl::memory::dims;
  const dnnl::memory::desc a_md(dims{m, k}, dt::bf16, dims{k, 1});
  const dnnl::memory::desc b_md(dims{k, n}, dt::bf16, trans_b ? dims{1, k} : dims{n, 1});
  const dnnl::memory::desc c_md(dims{m, n}, dt::bf16, dims{n, 1});
  const dnnl::memory::desc bias_md(dims{1, n}, dt::bf16, dims{n, 1});
  // Creating a primitive costs milliseconds: one per shape, per thread.
  thread_local absl::flat_hash_map<Bf16Key, dnnl::matmul> cache;
  const Bf16Key key{trans_b, bias != nullptr, m, n, k};
  try {
    auto it = cache.find(key);
    if (it == cache.end()) {
      if (cache.size() > 256) cache.clear();
      dnnl::matmul::primitive_desc pd =
          bias != nullptr
              ? dnnl::matmul::primitive_desc(dnnl::matmul::desc(a_md, b_md, bias_md, c_md),
                                             CpuEngine())
              : dnnl::matmul::primitive_desc(dnnl::matmul::desc(a_md, b_md, c_md), CpuEngine());
      it = cache.emplace(key, dnnl::matmul(pd)).first;
    }
    dnnl::stream stream(CpuEngine());
    std::unordered_map<int, dnnl::memory> args = {
        {DNNL_ARG_SRC, dnnl::memory(a_md, CpuEngine(), const_cast<uint16_t*>(a))},
        {DNNL_ARG_WEIGHTS, dnnl::memory(b_md, CpuEngine(), const_cast<uint16_t*>(b))},
        {DNNL_ARG_DST, dnnl::memory(c_md, CpuEngine(), c)}};
    if (bias != nullptr) {
      args.emplace(DNNL_ARG_BIAS, dnnl::memory(bias_md, CpuEngine(), const_cast<uint16_t*>(bias)));
    }
    it->second.execute(stream, args);
    stream.wait();
  } catch (const dnnl::error& e) {
    return absl::InternalError(absl::StrCat("oneDNN bf16 matmul ", m, "x", n, "x", k,
                                            " failed: ", e.what()));
  }
  return absl::OkStatus();
}

void Transpose(const float* in, int64_t rows, int64_t cols, float* out) {
  // Blocked so both sides stay in cache.
  constexpr int64_t kBlock = 32;
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock)
    for (int64_t j0 = 0; j0 < cols; j0 += kBlock)
      for (int64_t i = i0; i < std::min(rows, i0 + kBlock); ++i)
        for (int64_t j = j0; j < std::min(cols, j0 + kBlock); ++j)
          out[j * rows + i] = in[i * cols + j];
}

PIPESERVE_VECTOR_CLONES
void Relu(const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] < 0.0f ? 0.0f : x[i];  // NaN stays NaN, as in torch
}

}  // namespace pipeserve
