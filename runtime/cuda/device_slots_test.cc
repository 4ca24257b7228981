// SlotPool (one caller keeps one slot, at most max_slots in use, a waiter
// gets the next returned one, factory errors) and concurrent Run calls on
// the device emulator, whose programs use the pool as the CUDA program does.
#include "runtime/cuda/device_slots.h"
#include "runtime/random_tensor.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <random>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "runtime/backend.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/cuda/device_emulator.h"

namespace pipeserve {
namespace {

struct Counted {
  std::atomic<int> users{0};
};

SlotPool<Counted>::Factory MakeCounted(std::atomic<int>* made) {
  return [made]() -> absl::StatusOr<std::unique_ptr<Counted>> {
    ++*made;
    return std::make_unique<Counted>();
  };
}

TEST(SlotPoolTest, OneCallerAtATimeKeepsReusingOneSlot) {
  std::atomic<int> made{0};
  SlotPool<Counted> pool(4, MakeCounted(&made));
  Counted* first = nullptr;
  for (int i = 0; i < 10; ++i) {
    auto lease = pool.Acquire();
    ASSERT_TRUE(lease.ok()) << lease.status();
    if (first == nullptr) first = lease->get();
    EXPECT_EQ(lease->get(), first);
  }
  EXPECT_EQ(made, 1);
  EXPECT_EQ(pool.slots_made(), 1);
  EXPECT_EQ(pool.max_slots(), 4);
}

TEST(SlotPoolTest, MaxSlotsClampedToOne) {
  std::atomic<int> made{0};
  SlotPool<Counted> pool(0, MakeCounted(&made));
  EXPECT_EQ(pool.max_slots(), 1);
}

TEST(SlotPoolTest, CallerBeyondTheMaximumWaitsForAReturnedSlot) {
  std::atomic<int> made{0};
  SlotPool<Counted> pool(2, MakeCounted(&made));
  auto a = pool.Acquire();
  auto b = pool.Acquire();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE(a->get(), b->get());
  Counted* returned = b->get();
  std::atomic<bool> got{false};
  Counted* third = nullptr;
  std::thread waiter([&] {
    auto c = pool.Acquire();
    ASSERT_TRUE(c.ok());
    third = c->get();
    got = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(got) << "a third caller must wait while two slots are in use";
  { auto release = std::move(*b); }  // the lease ends: slot b goes back
  waiter.join();
  EXPECT_TRUE(got);
  EXPECT_EQ(third, returned);
  EXPECT_EQ(made, 2);
}

TEST(SlotPoolTest, ConcurrentCallersNeverShareASlot) {
  std::atomic<int> made{0};
  SlotPool<Counted> pool(3, MakeCounted(&made));
  std::atomic<int> in_use{0}, most_in_use{0}, shared{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 300; ++i) {
        auto lease = pool.Acquire();
        if (!lease.ok()) {
          ++shared;
          continue;
        }
        if ((*lease)->users.fetch_add(1) != 0) ++shared;
        int now = ++in_use;
        int seen = most_in_use;
        while (now > seen && !most_in_use.compare_exchange_weak(seen, now)) {
        }
        std::this_thread::yield();
        --in_use;
        (*lease)->users.fetch_sub(1);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(shared, 0);
  EXPECT_LE(most_in_use, 3);
  EXPECT_LE(made, 3);
  EXPECT_EQ(pool.slots_made(), made.load());
}

TEST(SlotPoolTest, FactoryErrorIsReturnedAndRetriedNextTime) {
  int calls = 0;
  SlotPool<Counted> pool(2, [&]() -> absl::StatusOr<std::unique_ptr<Counted>> {
    if (++calls == 1) return absl::ResourceExhaustedError("out of memory");
    return std::make_unique<Counted>();
  });
  auto a = pool.Acquire();
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(pool.slots_made(), 0);
  auto b = pool.Acquire();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(pool.slots_made(), 1);
}


// ExampleCode's ops as one stage (mm, broadcast-free add, relu, linear with
// a fused ReLU, a skip connection).
Model Stage(int d) {
  GraphBuilder b;
  b.Input("x", {-1, d}).Input("y", {-1, d});
  b.Param("p", {d, d}).Param("lin.weight", {d, d}).Param("lin.bias", {d});
  b.Op("mm", {"x", "p"}, "m").Op("add", {"m", "y"}, "a").Op("relu", {"a"}, "r");
  b.Op("linear", {"r", "lin.weight", "lin.bias"}, "l", "lin")
      .Op("relu", {"l"}, "l2");
  b.Op("add", {"l2", "m"}, "o").Op("clone", {"m"}, "skip");
  b.Output("o").Output("skip");
  return b.Build();
}

TEST(EmulatorConcurrencyTest, MaxConcurrentRunsReportsTheOption) {
  Model m = Stage(8);
  auto one = MakeDeviceEmulatorBackend(Precision::kFloat32)
                 ->Compile(m.graph, m.weights);
  auto three = MakeDeviceEmulatorBackend(Precision::kFloat32, 3)
                   ->Compile(m.graph, m.weights);
  auto cpu = MakeCpuBackend({})->Compile(m.graph, m.weights);
  ASSERT_TRUE(one.ok() && three.ok() && cpu.ok());
  EXPECT_EQ((*one)->max_concurrent_runs(), 1);
  EXPECT_EQ((*three)->max_concurrent_runs(), 3);
  EXPECT_EQ((*cpu)->max_concurrent_runs(), 1);  // the interface's default
}

TEST(EmulatorConcurrencyTest, ConcurrentRunsWithDifferentInputsAreEachRight) {
  constexpr int kThreads = 3, kRuns = 12, kDim = 24;
  Model m = Stage(kDim);
  auto emu = MakeDeviceEmulatorBackend(Precision::kFloat32, kThreads)
                 ->Compile(m.graph, m.weights);
  auto cpu = MakeCpuBackend({})->Compile(m.graph, m.weights);
  ASSERT_TRUE(emu.ok() && cpu.ok());
  ASSERT_EQ((*emu)->max_concurrent_runs(), kThreads);
  // Each (thread, run) its own inputs and batch size; answers from the
  // CPU backend beforehand.
  std::vector<std::vector<std::vector<Tensor>>> in(kThreads), want(kThreads);
  std::mt19937 rng(5);
  for (int t = 0; t < kThreads; ++t) {
    for (int r = 0; r < kRuns; ++r) {
      int64_t batch = 1 + (t * kRuns + r) % 5;
      in[t].push_back(
          {RandomTensor({batch, kDim}, &rng), RandomTensor({batch, kDim}, &rng)});
      auto out = (*cpu)->Run(in[t].back());
      ASSERT_TRUE(out.ok()) << out.status();
      want[t].push_back(*out);
    }
  }
  std::vector<std::string> errors(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < kRuns && errors[t].empty(); ++r) {
        auto got = (*emu)->Run(in[t][r]);
        if (!got.ok()) {
          errors[t] = got.status().ToString();
          break;
        }
        for (size_t o = 0; o < got->size(); ++o) {
          const Tensor &g = (*got)[o], &w = want[t][r][o];
          if (g.shape() != w.shape()) {
            errors[t] = "shape differs";
            break;
          }
          for (int64_t i = 0; i < g.numel(); ++i) {
            if (!(std::fabs(g.data()[i] - w.data()[i]) <= 1e-4)) {
              errors[t] = "thread " + std::to_string(t) + " run " +
                          std::to_string(r) + " output " + std::to_string(o) +
                          " element " + std::to_string(i) + ": " +
                          std::to_string(g.data()[i]) + " vs " +
                          std::to_string(w.data()[i]);
              break;
            }
          }
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(errors[t], "") << "thread " << t;
}

}  // namespace
}  // namespace pipeserve
