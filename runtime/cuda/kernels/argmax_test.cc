// argmax.h's FirstLargest (a block a row) in float32, float16 and bfloat16 on the simt
// emulator against std::max_element (what the CPU's greedy sample_tokens
// picks) over the same values: rows shorter than a warp, across warps and
// past a block's stride, ties inside one thread's strip and across warps,
// -inf rows, NaNs in the middle, a NaN first, and a row of NaNs.
#include "runtime/cuda/kernels/argmax.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace pipeserve::kernels {
namespace {

// out[r] = FirstLargest of row r of x [rows, cols]. One block of
// kArgmaxThreads per row (grid.x = rows).
template <typename T>
SIMT_GLOBAL void ArgmaxRows(const T* __restrict__ x, int64_t cols, int64_t* __restrict__ out) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  SIMT_SHARED(float, values, kWarpSize);
  SIMT_SHARED(int64_t, indices, kWarpSize);
  const int64_t row = BlockIdx().x;
  const int64_t at = FirstLargest(x + row * cols, cols, values, indices);
  if (ThreadIdx().x == 0) out[row] = at;
}

template <typename T>
std::vector<int64_t> RunArgmax(const std::vector<std::vector<float>>& rows, int64_t cols,
                               std::vector<std::vector<float>>* rounded) {
  std::vector<T> x;
  rounded->clear();
  for (const std::vector<float>& r : rows) {
    rounded->emplace_back();
    for (float v : r) {
      x.push_back(simt::FromFloat<T>(v));
      rounded->back().push_back(simt::ToFloat(x.back()));
    }
  }
  std::vector<int64_t> out(rows.size(), -1);
  absl::Status s = simt::Emulate(static_cast<unsigned>(rows.size()), kArgmaxThreads,
                                 [&] { ArgmaxRows<T>(x.data(), cols, out.data()); });
  EXPECT_TRUE(s.ok()) << s;
  return out;
}

std::vector<std::vector<float>> Rows(int64_t cols, std::mt19937* rng) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::uniform_real_distribution<float> u(-4, 4);
  std::vector<std::vector<float>> rows(8, std::vector<float>(cols));
  for (auto& r : rows) {
    for (float& v : r) v = u(*rng);
  }
  auto put = [&](int row, int64_t at, float v) {
    if (at < cols) rows[row][at] = v;
  };
  put(1, cols - 1, 9);                           // the last column
  put(2, cols / 3, 9), put(2, cols - 1, 9);      // a tie: the first wins
  put(3, 0, 9), put(3, 256, 9), put(3, 33, 9);  // ties in one strip and across warps
  for (float& v : rows[4]) v = -inf;
  put(5, cols / 2, nan), put(5, cols - 1, 9);  // a NaN never wins
  put(6, 0, nan), put(6, cols - 1, 9);         // unless it comes first
  for (float& v : rows[7]) v = nan;
  return rows;
}

template <typename T>
void CheckType(const std::string& name) {
  std::mt19937 rng(5);
  for (int64_t cols : {1, 7, 32, 255, 256, 257, 1000, 5003}) {
    std::vector<std::vector<float>> rounded;
    const std::vector<std::vector<float>> rows = Rows(cols, &rng);
    const std::vector<int64_t> got = RunArgmax<T>(rows, cols, &rounded);
    for (size_t r = 0; r < rows.size(); ++r) {
      const int64_t want =
          std::max_element(rounded[r].begin(), rounded[r].end()) - rounded[r].begin();
      EXPECT_EQ(got[r], want) << name << " cols " << cols << " row " << r;
    }
  }
}

TEST(ArgmaxRows, PicksWhatMaxElementPicksInEveryFloatType) {
  CheckType<float>("float32");
  CheckType<simt::Half>("float16");
  CheckType<simt::Bf16>("bfloat16");
}

}  // namespace
}  // namespace pipeserve::kernels
