#include "tests/load.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"
#include "gtest/gtest.h"

namespace pipeserve {

std::vector<NamedTensor> NamedInputs(const Fixture& f) {
  std::vector<NamedTensor> in;
  for (int i = 0; i < f.model.graph.inputs_size(); ++i) {
    in.push_back({f.model.graph.inputs(i).name(), f.inputs[i]});
  }
  return in;
}

absl::StatusOr<Tensor> UploadAndAnswer(const std::string& address, const std::string& name,
                                       const Fixture& f, const UploadOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<Client> client, Client::Connect(address));
  RETURN_IF_ERROR(client->Upload(name, f.path, options).status());
  ASSIGN_OR_RETURN(std::vector<NamedTensor> out, client->Infer(name, NamedInputs(f)));
  if (out.empty() || f.expected.empty()) return absl::InternalError("no outputs");
  if (!SameAnswer(out[0].tensor, f.expected[0])) {
    return absl::InternalError(absl::StrCat("the first answer of \"", name,
                                            "\" differs from PyTorch's: shape ",
                                            ShapeToString(out[0].tensor.shape()), " vs ",
                                            ShapeToString(f.expected[0].shape())));
  }
  return f.expected[0];
}

bool SameAnswer(const Tensor& got, const Tensor& want) {
  if (got.shape() != want.shape() || got.dtype() != DT_FLOAT32 || want.dtype() != DT_FLOAT32) {
    return false;
  }
  float scale = 1;
  for (int64_t i = 0; i < want.numel(); ++i) scale = std::max(scale, std::fabs(want.data()[i]));
  for (int64_t i = 0; i < want.numel(); ++i) {
    if (!(std::fabs(got.data()[i] - want.data()[i]) <= 1e-4f * scale)) return false;
  }
  return true;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())))];
}

std::vector<Outcome> RunLoad(const std::string& address, const std::string& model,
                             const std::vector<NamedTensor>& inputs, const Tensor& want,
                             int clients, absl::Duration length, absl::Duration after,
                             const std::function<void()>& disrupt, absl::Time* disrupted) {
  absl::Mutex mu;
  std::vector<Outcome> outcomes;
  const absl::Time start = absl::Now(), end = start + length;
  std::vector<std::thread> threads;
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&] {
      auto client = Client::Connect(address);
      if (!client.ok()) {
        absl::MutexLock lock(&mu);
        outcomes.push_back({absl::Now(), absl::ZeroDuration(), client.status(), false});
        return;
      }
      while (absl::Now() < end) {
        Outcome o;
        o.start = absl::Now();
        auto out = (*client)->Infer(model, inputs, absl::Seconds(30));
        o.latency = absl::Now() - o.start;
        o.status = out.status();
        o.right = out.ok() && !out->empty() && SameAnswer((*out)[0].tensor, want);
        absl::MutexLock lock(&mu);
        outcomes.push_back(o);
      }
    });
  }
  absl::SleepFor(after);
  *disrupted = absl::Now();
  disrupt();
  for (std::thread& t : threads) t.join();
  return outcomes;
}

void Report(const std::string& what, const std::vector<Outcome>& outcomes, absl::Time disrupted,
            absl::Duration window) {
  int failed = 0, wrong = 0, later = 0, served_later = 0;
  std::vector<double> all, during;
  absl::Status first_error;
  for (const Outcome& o : outcomes) {
    if (o.start >= disrupted + window) {
      ++later;
      served_later += o.status.ok() && o.right;
    }
    if (!o.status.ok()) {
      ++failed;
      if (first_error.ok()) first_error = o.status;
    } else if (!o.right) {
      ++wrong;
    }
    double ms = absl::ToDoubleMilliseconds(o.latency);
    all.push_back(ms);
    if (o.start >= disrupted - absl::Seconds(1) && o.start < disrupted + window) {
      during.push_back(ms);
    }
  }
  std::printf("\n%-30s %9s %7s %6s %8s %8s %15s %15s\n", what.c_str(), "requests", "failed",
              "wrong", "p50 ms", "p99 ms", "p99 disrupt ms", "max disrupt ms");
  std::printf("%-30s %9zu %7d %6d %8.1f %8.1f %15.1f %15.1f\n", "", outcomes.size(), failed,
              wrong, Percentile(all, 0.5), Percentile(all, 0.99), Percentile(during, 0.99),
              Percentile(during, 1.0));
  std::fflush(stdout);
  EXPECT_GT(outcomes.size(), 0u);
  EXPECT_EQ(failed, 0) << "first failure: " << first_error;
  EXPECT_EQ(wrong, 0);
  if (later > 0) {
    EXPECT_GT(served_later, 0) << "none of the " << later
                               << " requests started after the disruption window was served";
  }
}

}  // namespace pipeserve
