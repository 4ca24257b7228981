// sample_tokens on the GPU, written once against simt.h: each row's next
// token picked as runtime/sampler.cc's SampleToken picks it (greedy, the
// repetition and frequency penalties, temperature, top-k, top-p and the
// same seeded draw, runtime/sample_draw.h), so only token ids leave the
// device. nvcc compiles it (transformer_kernels.cu); the device emulator
// and sample_test run the same source on the CPU.
//
// The CPU sorts a row's vocabulary (most likely first, equal logits by id)
// and walks it. Nothing is sorted here: each cut (the k-th token, the end
// of the nucleus, the draw) is the first token in that order whose running
// weight passes a target, found 4 bits at a time over the token's rank (its
// penalised logit's bits, then its id). Each pass sums the weights of the
// tokens still in play per next digit, and descends into the digit where
// the running sum passes the target; a pass that leaves one token ends the
// search. The sums go in a fixed order (each thread its tokens in turn,
// warp butterflies, warps in turn), so a row picks the same token every
// run. They round differently from the CPU's running sums, so the two
// pick differently only where a draw lands within rounding of a boundary.
#ifndef PIPESERVE_RUNTIME_CUDA_KERNELS_SAMPLE_H_
#define PIPESERVE_RUNTIME_CUDA_KERNELS_SAMPLE_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#include "runtime/cuda/kernels/argmax.h"
#include "runtime/cuda/kernels/launch_args.h"
#include "runtime/cuda/simt/reduce.h"
#include "runtime/cuda/simt/simt.h"
#include "runtime/sample_draw.h"

namespace pipeserve::kernels {

inline constexpr int kSampleBins = 16;     // 4 bits of a rank a pass
inline constexpr int kSampleSlices = kSampleThreads / kSampleBins;  // 16 threads each
inline constexpr int kSampleLevels = 24;   // the key's 64 bits, then the id's 32

// A token's place in SampleToken's order as one number: larger comes
// first. key: the penalised logit's bits made monotone (NaN after every
// number, -0 the same as +0); nid: ~id, so the lower id of two equal
// logits comes first.
struct SampleRank {
  uint64_t key = 0;
  uint32_t nid = 0;
};

SIMT_DEVICE SampleRank RankOf(double x, int64_t id) {
  SampleRank r;
  r.nid = ~static_cast<uint32_t>(id);
  if (x != x) return r;
  if (x == 0) x = 0;
  uint64_t bits;
  memcpy(&bits, &x, sizeof bits);
  r.key = (bits >> 63) != 0 ? ~bits : bits | (uint64_t{1} << 63);
  return r;
}

// Whether a comes before b in the order, or is b.
SIMT_DEVICE bool AtOrBefore(SampleRank a, SampleRank b) {
  return a.key > b.key || (a.key == b.key && a.nid >= b.nid);
}

// Digit `level` of r: 0 is the key's top 4 bits, 23 the id's last 4.
SIMT_DEVICE int RankDigit(SampleRank r, int level) {
  return level < 16 ? static_cast<int>((r.key >> (60 - 4 * level)) & 15)
                    : static_cast<int>((r.nid >> (28 - 4 * (level - 16))) & 15);
}

// Whether r has digits [0, level) of `prefix`.
SIMT_DEVICE bool SharesDigits(SampleRank r, SampleRank prefix, int level) {
  if (level == 0) return true;
  if (level <= 16) return (r.key >> (64 - 4 * level)) == (prefix.key >> (64 - 4 * level));
  const int shift = 32 - 4 * (level - 16);
  return r.key == prefix.key && (r.nid >> shift) == (prefix.nid >> shift);
}

SIMT_DEVICE SampleRank WithDigit(SampleRank prefix, int level, int digit) {
  if (level < 16) {
    prefix.key |= static_cast<uint64_t>(digit) << (60 - 4 * level);
  } else {
    prefix.nid |= static_cast<uint32_t>(digit) << (28 - 4 * (level - 16));
  }
  return prefix;
}

// What a cut sums over the tokens: 1 each (counting, for top-k), or the
// probability before normalising, exp(x / temperature - top), as
// SampleToken computes it.
struct SampleWeight {
  bool count = true;
  double temperature = 1, top = 0;
  SIMT_DEVICE double operator()(double x) const {
    return count ? 1.0 : simt::Exp(x / temperature - top);
  }
};

// The tokens in play: every one, or those at or before `last`.
struct SampleKept {
  bool bounded = false;
  SampleRank last;
  SIMT_DEVICE bool Holds(SampleRank r) const { return !bounded || AtOrBefore(r, last); }
};

// The tokens a pass walks: every token of the row (ids null: token i is
// i), or a gathered list of ids; x holds the whole row's penalised logits,
// by id.
struct SampleTokens {
  const double* x = nullptr;
  const int32_t* ids = nullptr;
  int64_t n = 0;
  SIMT_DEVICE int64_t Id(int64_t i) const { return ids == nullptr ? i : ids[i]; }
};

// A cut's token, with the weight of the tokens before it and its own.
struct SampleCut {
  bool found = false;
  SampleRank rank;
  int64_t id = 0;
  double before = 0, weight = 0;
};

// The block's shared scratch. A pass's sums per digit go from each thread
// (part_*, digit-major) to slices of 16 threads (slice_*) to thread 0,
// which chooses the digit (choice: the digit or -1, and its count; before:
// the weight before it); `token` is the id of a digit's only token.
struct SampleShared {
  simt::SharedPtr<double> part_mass;     // [kSampleBins * kSampleThreads]
  simt::SharedPtr<uint16_t> part_count;  // [kSampleBins * kSampleThreads]
  simt::SharedPtr<double> slice_mass;    // [kSampleBins * kSampleSlices]
  simt::SharedPtr<int32_t> slice_count;  // [kSampleBins * kSampleSlices]
  simt::SharedPtr<double> before;        // [1]
  simt::SharedPtr<int32_t> choice;       // [2]
  simt::SharedPtr<int64_t> token;        // [1]
  simt::SharedPtr<double> reduce;        // [kWarpSize]
  simt::SharedPtr<uint64_t> bits;        // [kWarpSize]
  simt::SharedPtr<int32_t> offsets;      // [kSampleThreads + 1]: Gather's
};

struct SumOf {
  SIMT_DEVICE double operator()(double a, double b) const { return a + b; }
};
struct LargerOf {
  SIMT_DEVICE double operator()(double a, double b) const { return b > a ? b : a; }
};

// One pass: each digit's weight and count over this thread's kept tokens
// whose rank has `prefix`'s first `level` digits, into sh.part_*.
SIMT_DEVICE void SumDigits(SampleTokens s, SampleKept kept, SampleWeight w,
                           SampleRank prefix, int level, const SampleShared& sh) {
  const int t = static_cast<int>(simt::ThreadIdx().x);
  double mass[kSampleBins];
  int32_t count[kSampleBins];
  SIMT_UNROLL
  for (int b = 0; b < kSampleBins; ++b) {
    mass[b] = 0;
    count[b] = 0;
  }
  for (int64_t i = t; i < s.n; i += kSampleThreads) {
    const int64_t c = s.Id(i);
    const SampleRank r = RankOf(s.x[c], c);
    if (!kept.Holds(r) || !SharesDigits(r, prefix, level)) continue;
    const int d = RankDigit(r, level);
    const double v = w(s.x[c]);
    SIMT_UNROLL
    for (int b = 0; b < kSampleBins; ++b) {  // constant indices: registers on the GPU
      mass[b] += b == d ? v : 0.0;
      count[b] += b == d ? 1 : 0;
    }
  }
  SIMT_UNROLL
  for (int b = 0; b < kSampleBins; ++b) {
    sh.part_mass[b * kSampleThreads + t] = mass[b];
    sh.part_count[b * kSampleThreads + t] = static_cast<uint16_t>(count[b]);
  }
}

// After SumDigits and a barrier: thread t sums digit t / kSampleSlices
// over slice t % kSampleSlices of the threads, into sh.slice_*.
SIMT_DEVICE void SumSlices(const SampleShared& sh) {
  const int t = static_cast<int>(simt::ThreadIdx().x);
  const int b = t / kSampleSlices, first = b * kSampleThreads + (t % kSampleSlices) * kSampleSlices;
  double m = 0;
  int32_t n = 0;
  for (int k = 0; k < kSampleSlices; ++k) {
    m += sh.part_mass[first + k];
    n += sh.part_count[first + k];
  }
  sh.slice_mass[t] = m;
  sh.slice_count[t] = n;
}

// Thread 0, after SumSlices and a barrier: the first digit (largest
// first) where the running weight passes `target` (reaches it, when
// at_least), into sh.choice and sh.before. Below the first level the
// tokens in play passed it as a whole one level up, so when their digits'
// sums (added in another order) round short of it, the last digit is it.
SIMT_DEVICE void ChooseDigit(double target, bool at_least, bool first_level, double before,
                             const SampleShared& sh) {
  int32_t chosen = -1, n = 0, last = -1, last_n = 0;
  double last_before = before;
  for (int d = kSampleBins - 1; d >= 0 && chosen < 0; --d) {
    double m = 0;
    int32_t c = 0;
    for (int s = 0; s < kSampleSlices; ++s) {
      m += sh.slice_mass[d * kSampleSlices + s];
      c += sh.slice_count[d * kSampleSlices + s];
    }
    if (c == 0) continue;
    if (at_least ? before + m >= target : before + m > target) {
      chosen = d;
      n = c;
    } else {
      last = d;
      last_n = c;
      last_before = before;
      before += m;
    }
  }
  if (chosen < 0 && !first_level) {
    chosen = last;
    n = last_n;
    before = last_before;
  }
  sh.before[0] = before;
  sh.choice[0] = chosen;
  sh.choice[1] = n;
}

// The id of the only kept token whose rank has `prefix`'s first `levels`
// digits; every thread gets it.
SIMT_DEVICE int64_t OnlyToken(SampleTokens s, SampleKept kept, SampleRank prefix,
                              int levels, const SampleShared& sh) {
  for (int64_t i = simt::ThreadIdx().x; i < s.n; i += kSampleThreads) {
    const int64_t c = s.Id(i);
    const SampleRank r = RankOf(s.x[c], c);
    if (kept.Holds(r) && SharesDigits(r, prefix, levels)) sh.token[0] = c;
  }
  simt::SyncThreads();
  const int64_t id = sh.token[0];
  simt::SyncThreads();  // read by every thread before another search writes it
  return id;
}

// Which digits of a row's ranks differ between its tokens (bit `level` of
// `varying`); the others are all `common`'s. Logits of 16 bits have 42
// (float16) or 45 (bfloat16) bits of zeros past their mantissa, and a
// vocabulary of 32000 ids 17 bits of ones above them: no pass is spent on
// digits that split nothing.
struct SampleLevels {
  uint32_t varying = 0;
  SampleRank common;
};

struct BitsOr {
  SIMT_DEVICE uint64_t operator()(uint64_t a, uint64_t b) const { return a | b; }
};

SIMT_DEVICE SampleLevels LevelsOf(const double* x, int64_t cols, const SampleShared& sh) {
  SampleLevels l;
  l.common = RankOf(x[0], 0);
  uint64_t key = 0, nid = 0;  // the bits where some token differs from token 0
  for (int64_t c = simt::ThreadIdx().x; c < cols; c += kSampleThreads) {
    const SampleRank r = RankOf(x[c], c);
    key |= r.key ^ l.common.key;
    nid |= r.nid ^ l.common.nid;
  }
  key = simt::BlockAllReduce(key, sh.bits, BitsOr(), uint64_t{0});
  nid = simt::BlockAllReduce(nid, sh.bits, BitsOr(), uint64_t{0});
  for (int level = 0; level < kSampleLevels; ++level) {
    SampleRank d;
    d.key = key;
    d.nid = static_cast<uint32_t>(nid);
    if (RankDigit(d, level) != 0) l.varying |= 1u << level;
  }
  return l;
}

// The first kept token in SampleToken's order whose running weight (its
// own included) passes `target` (reaches it, when at_least); not found
// when the kept tokens' whole weight does not. Every thread gets it.
SIMT_DEVICE SampleCut FirstPast(SampleTokens s, SampleKept kept, SampleWeight w,
                                double target, bool at_least, SampleLevels levels,
                                const SampleShared& sh) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  SampleRank prefix;
  double before = 0;
  int first = -1;  // the first level that splits the tokens
  for (int level = 0; level < kSampleLevels; ++level) {
    if ((levels.varying >> level & 1u) == 0) {  // one digit for all: nothing to sum
      prefix = WithDigit(prefix, level, RankDigit(levels.common, level));
      continue;
    }
    if (first < 0) first = level;
    SumDigits(s, kept, w, prefix, level, sh);
    SyncThreads();
    SumSlices(sh);
    SyncThreads();
    if (ThreadIdx().x == 0) ChooseDigit(target, at_least, level == first, before, sh);
    SyncThreads();
    // Nothing writes these again before every thread has passed the next
    // pass's first barrier.
    const int32_t digit = sh.choice[0], n = sh.choice[1];
    before = sh.before[0];
    if (digit < 0) return SampleCut();
    prefix = WithDigit(prefix, level, digit);
    if (n == 1) {  // a token of its own
      SampleCut cut;
      cut.found = true;
      cut.id = OnlyToken(s, kept, prefix, level + 1, sh);
      cut.rank = RankOf(s.x[cut.id], cut.id);
      cut.before = before;
      cut.weight = w(s.x[cut.id]);
      return cut;
    }
  }
  // Every token in play has every digit alike: one token (ranks are unique).
  SampleCut cut;
  cut.found = true;
  cut.id = OnlyToken(s, kept, prefix, kSampleLevels, sh);
  cut.rank = RankOf(s.x[cut.id], cut.id);
  cut.before = before;
  cut.weight = w(s.x[cut.id]);
  return cut;
}

// The largest of x (NaNs left out), and the kept tokens' whole weight.
SIMT_DEVICE double Largest(SampleTokens s, const SampleShared& sh) {
  double v = -HUGE_VAL;
  for (int64_t i = simt::ThreadIdx().x; i < s.n; i += kSampleThreads) {
    const double x = s.x[s.Id(i)];
    if (x > v) v = x;
  }
  return simt::BlockAllReduce(v, sh.reduce, LargerOf(), -HUGE_VAL);
}

SIMT_DEVICE double KeptWeight(SampleTokens s, SampleKept kept, SampleWeight w,
                              const SampleShared& sh) {
  double v = 0;
  for (int64_t i = simt::ThreadIdx().x; i < s.n; i += kSampleThreads) {
    const int64_t c = s.Id(i);
    if (kept.Holds(RankOf(s.x[c], c))) v += w(s.x[c]);
  }
  return simt::BlockAllReduce(v, sh.reduce, SumOf(), 0.0);
}

// The kept tokens of s as a list of ids in `out` (kSampleCompact of them
// at most), so later passes walk only them; s itself when more are kept.
// The order is the threads' (deterministic): a cut does not depend on it.
SIMT_DEVICE SampleTokens Gather(SampleTokens s, SampleKept kept, int32_t* out,
                                const SampleShared& sh) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  const int t = static_cast<int>(ThreadIdx().x);
  int32_t n = 0;
  for (int64_t i = t; i < s.n; i += kSampleThreads) {
    const int64_t c = s.Id(i);
    n += kept.Holds(RankOf(s.x[c], c)) ? 1 : 0;
  }
  sh.offsets[t] = n;
  SyncThreads();
  if (t == 0) {  // exclusive sums; the total last
    int32_t total = 0;
    for (int k = 0; k < kSampleThreads; ++k) {
      const int32_t mine = sh.offsets[k];
      sh.offsets[k] = total;
      total += mine;
    }
    sh.offsets[kSampleThreads] = total;
  }
  SyncThreads();
  const int32_t total = sh.offsets[kSampleThreads];
  int32_t at = sh.offsets[t];
  SyncThreads();  // read by every thread before another gather writes them
  if (total > kSampleCompact) return s;
  for (int64_t i = t; i < s.n; i += kSampleThreads) {
    const int64_t c = s.Id(i);
    if (kept.Holds(RankOf(s.x[c], c))) out[at++] = static_cast<int32_t>(c);
  }
  SyncThreads();  // the list, written by every thread, is read by all
  SampleTokens list;
  list.x = s.x;
  list.ids = out;
  list.n = total;
  return list;
}

// x = the logits as doubles with SampleToken's penalties: a token anywhere
// in the context divided (positive) or multiplied by `repetition` once,
// then `frequency` subtracted once per occurrence among the context's last
// `generated`, in order. Thread t owns tokens t, t + kSampleThreads, ...:
// no two threads write one token, so its passes need no barrier.
template <typename T>
SIMT_DEVICE void Penalise(const T* logits, int64_t cols, const int64_t* context, int64_t len,
                          int64_t generated, double repetition, double frequency, double* x) {
  const int64_t t = simt::ThreadIdx().x;
  constexpr double kSeen = 1.0000000000000002;  // 1 + 2^-52: no float is this
  for (int64_t c = t; c < cols; c += kSampleThreads) x[c] = simt::ToFloat(logits[c]);
  auto owned = [&](int64_t id) { return id >= 0 && id < cols && id % kSampleThreads == t; };
  if (repetition != 1) {
    for (int64_t j = 0; j < len; ++j) {
      if (owned(context[j])) x[context[j]] = kSeen;
    }
    for (int64_t c = t; c < cols; c += kSampleThreads) {
      if (x[c] != kSeen) continue;
      const double v = simt::ToFloat(logits[c]);
      x[c] = v > 0 ? v / repetition : v * repetition;
    }
  }
  if (frequency != 0) {
    for (int64_t j = len - (generated < len ? generated : len); j < len; ++j) {
      if (owned(context[j])) x[context[j]] -= frequency;
    }
  }
}

// The token SampleToken picks from the penalised row x (every thread gets
// it): greedy at a temperature under kGreedyBelow; else the top_k most likely (0: all), of
// those the fewest whose probabilities reach top_p of theirs, and a draw
// among them with UniformDraw(seed, generated). Once the kept tokens fit
// `compact` (kSampleCompact ids), later passes walk only them.
SIMT_DEVICE int64_t PickToken(const double* x, int64_t cols, double temperature, double top_p,
                              int64_t top_k, uint64_t seed, int64_t generated, int32_t* compact,
                              const SampleShared& sh) {
  const SampleWeight count;
  SampleKept kept;
  SampleTokens s;
  s.x = x;
  s.n = cols;
  const SampleLevels levels = LevelsOf(x, cols, sh);
  auto first_kept = [&] { return FirstPast(s, kept, count, 0.5, false, levels, sh).id; };
  // The kept tokens as a list, when they fit: every one of them is kept.
  auto narrow = [&] {
    if (s.ids != nullptr) return;
    s = Gather(s, kept, compact, sh);
    if (s.ids != nullptr) kept = SampleKept();
  };
  if (temperature < kGreedyBelow) {
    if (x[0] != x[0]) return 0;  // std::max_element keeps a NaN it starts with
    return first_kept();
  }
  if (top_k > 0 && top_k < cols) {
    kept = {true, FirstPast(s, kept, count, top_k - 0.5, false, levels, sh).rank};
    narrow();
  }
  SampleWeight prob;
  prob.count = false;
  prob.temperature = temperature;
  prob.top = Largest(s, sh) / temperature;  // the largest is always kept
  double sum = KeptWeight(s, kept, prob, sh);
  if (top_p < 1) {
    // An infinite logit makes the sum NaN: SampleToken's nucleus then
    // stops at its first token.
    if (sum != sum) return first_kept();
    const SampleCut nucleus = FirstPast(s, kept, prob, top_p * sum, true, levels, sh);
    if (nucleus.found) {
      kept = {true, nucleus.rank};
      sum = nucleus.before + nucleus.weight;
      narrow();
    }
  }
  const SampleCut drawn =
      FirstPast(s, kept, prob, UniformDraw(seed, generated) * sum, false, levels, sh);
  if (drawn.found) return drawn.id;
  // The draw passed every kept token (a NaN sum, or rounding): the last.
  if (kept.bounded) return static_cast<int64_t>(~kept.last.nid);
  return FirstPast(s, kept, count, static_cast<double>(s.n) - 0.5, false, levels, sh).id;
}

// Declares the block's SampleShared (46 KB) and calls f with it.
template <typename F>
SIMT_DEVICE void WithSampleShared(F f) {
  SIMT_SHARED(double, part_mass, kSampleBins * kSampleThreads);
  SIMT_SHARED(uint16_t, part_count, kSampleBins * kSampleThreads);
  SIMT_SHARED(double, slice_mass, kSampleBins * kSampleSlices);
  SIMT_SHARED(int32_t, slice_count, kSampleBins * kSampleSlices);
  SIMT_SHARED(double, before, 1);
  SIMT_SHARED(int32_t, choice, 2);
  SIMT_SHARED(int64_t, token, 1);
  SIMT_SHARED(double, reduce, simt::kWarpSize);
  SIMT_SHARED(uint64_t, bits, simt::kWarpSize);
  SIMT_SHARED(int32_t, offsets, kSampleThreads + 1);
  f(SampleShared{part_mass, part_count, slice_mass, slice_count, before, choice, token, reduce,
                 bits, offsets});
}

// a.out[r] = sample_tokens' pick for row r of logits [rows, a.cols]
// (graph/op_schema.cc), whose parameters the host has checked
// (CheckSampleRows). A row that samples greedily without penalties reads the
// logits only (the argmax); the others write their penalised logits to
// a.scratch. One block of kSampleThreads per row (grid.x = rows).
template <typename T>
SIMT_GLOBAL void SampleTokenRows(const T* __restrict__ logits, SampleArgs a) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  SIMT_SHARED(float, values, kWarpSize);
  SIMT_SHARED(int64_t, indices, kWarpSize);
  const int64_t row = BlockIdx().x;
  const float* f = a.floats + row * 4;  // temperature, top_p, repetition, frequency
  const int64_t* n = a.ints + row * 3;  // top_k, seed, tokens generated
  const T* xr = logits + row * a.cols;
  if (f[0] == 0 && f[2] == 1 && f[3] == 0) {  // greedy, no penalties: the first largest logit
    const int64_t at = FirstLargest(xr, a.cols, values, indices);
    if (ThreadIdx().x == 0) a.out[row] = at;
    return;
  }
  const int64_t begin = row == 0 ? 0 : a.ends[row - 1];
  double* x = a.scratch + row * a.cols;
  Penalise(xr, a.cols, a.context + begin, a.ends[row] - begin, n[2], f[2], f[3], x);
  SyncThreads();
  // After every row's logits (SampleScratchBytes).
  int32_t* compact = reinterpret_cast<int32_t*>(a.scratch + int64_t{GridDim().x} * a.cols) +
                     row * kSampleCompact;
  WithSampleShared([&](const SampleShared& sh) {
    const int64_t pick = PickToken(x, a.cols, f[0], f[1], n[0], static_cast<uint64_t>(n[1]),
                                   n[2], compact, sh);
    if (ThreadIdx().x == 0) a.out[row] = pick;
  });
}

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_SAMPLE_H_
