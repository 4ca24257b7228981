// bench/serving: what the gRPC pipeline costs, against same-run baselines.
//
//   bazel run -c opt //bench:serving [-- SECTION] [--device=cuda:0]
//       [--fixtures=DIR] [--python=PATH]
//
// SECTION runs one section (hop, large, pipeline, e2e, breakdown,
// batching, partition); --python is the interpreter that runs
// bench/torch_eager.py (it needs torch), found relative to the working
// directory. Rates count successful requests only, and every row whose
// requests did not all succeed says how many failed; a call that is timed
// alone (a latency, a baseline) and fails stops the benchmark, naming it.
//
// Everything runs in this process over loopback: stage servers are real
// StageServiceImpl gRPC servers on their own ports, driven by a real
// Coordinator (static launcher), exactly as in deployment minus the
// process boundaries.
//   1. Per-hop latency for a 16x512 float32 activation: identity stages,
//      1 vs 2 stages, against a plain gRPC bidi-stream ping-pong of the
//      same payload.
//   2. A 16 MiB activation across a hop, against loopback TCP bandwidth.
//   3. Pipelining: a 2-stage model (balanced) against the same model in one
//      stage, many microbatches in flight, one GEMM thread per stage.
//   4. ExampleCode at batch 256 through 4 stages against PyTorch eager and
//      the compute-only limit.
//   3 and 4 also print a ceiling: the cores' time over a request's compute
//   plus what loopback TCP (measured in the same run) spends in CPU to move
//   the request's bytes, which no transport over TCP could beat here. The
//   compute-only limits and ceilings time the CPU backend, so they are left
//   out (with a line saying so) when the stages compute on another device.
//   5. Where a served request's time goes (traced requests): transfer,
//      queue and compute per stage, serialization measured alone.
//   6. Dynamic batching: 64 clients sending batch-1 ExampleCode requests,
//      with batching against without, and the CPU each request costs.
//   7. Partitioning: a model of very different layer widths cut into 2
//      stages by measured node times against the FLOPs-plus-bytes
//      estimate, predicted against measured time per stage.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "bench/echo.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "bench/bench_util.h"
#include "common/server_process.h"
#include "partitioner/graph_builder.h"
#include "partitioner/partition.h"
#include "runtime/local_pipeline.h"
#include "runtime/model_file.h"
#include "runtime/backends.h"
#include "server/coordinator/core.h"
#include "server/coordinator/grpc_stage_client.h"
#include "server/stage/stage_server_core.h"
#include "server/stage/stage_service.h"
#include "server/testing/upload.h"
#include "server/transport/channels.h"
#include "server/transport/frame.h"
#include "tests/fixtures.h"

namespace pipeserve {
namespace {

using Clock = std::chrono::steady_clock;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Stops the benchmark: `what` failed, so a time taken around it would be
// the time of a failure. _Exit, not exit: in-process stage servers may
// still be running, and static destruction under them is not safe.
[[noreturn]] void Fail(const std::string& what, const std::string& why) {
  std::printf("bench/serving: %s failed: %s\n", what.c_str(), why.c_str());
  std::fflush(stdout);
  std::_Exit(1);
}

[[noreturn]] void Fail(const std::string& what, const absl::Status& status) {
  Fail(what, status.ToString());
}

// "  (3 of 80 requests failed)" for a row whose requests did not all
// succeed, else "".
std::string FailureNote(int failed, size_t succeeded) {
  if (failed == 0) return "";
  return absl::StrCat("  (", failed, " of ", failed + succeeded, " requests failed)");
}

// The machine's cores: what a ceiling divides among compute and transport.
int MachineCores() { return std::max(1, static_cast<int>(std::thread::hardware_concurrency())); }

// Cores the stages' compute can keep busy at once: one GEMM thread per
// stage, and no more than the machine has.
int ComputeCores(int stages) { return std::min(stages, MachineCores()); }

// "1 core", "4 cores".
std::string CoresLabel(int cores) { return absl::StrCat(cores, cores == 1 ? " core" : " cores"); }

// ---- baselines ------------------------------------------------------------

class EchoService final : public bench::Echo::Service {
  grpc::Status Chat(grpc::ServerContext*,
                    grpc::ServerReaderWriter<bench::Blob, bench::Blob>* stream) override {
    bench::Blob b;
    while (stream->Read(&b)) stream->Write(b);
    return grpc::Status::OK;
  }
};

// Median round trip of `payload` bytes over one bidi stream, sync API.
double PingPongMicros(const std::string& address, size_t payload, int iters) {
  auto channel = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(),
                                           StageChannelArgs());
  auto stub = bench::Echo::NewStub(channel);
  grpc::ClientContext ctx;
  auto stream = stub->Chat(&ctx);
  bench::Blob out, in;
  out.set_data(std::string(payload, 'x'));
  std::vector<double> t;
  for (int i = 0; i < iters + 20; ++i) {
    auto t0 = Clock::now();
    if (!stream->Write(out) || !stream->Read(&in)) {
      Fail(absl::StrCat("gRPC ping-pong round trip ", i, " (the hop baseline)"),
           stream->Finish().error_message());
    }
    if (i >= 20) t.push_back(Seconds(t0, Clock::now()) * 1e6);
  }
  stream->WritesDone();
  const grpc::Status finished = stream->Finish();
  if (!finished.ok()) Fail("gRPC ping-pong stream (the hop baseline)", finished.error_message());
  return Median(t);
}

// CPU seconds this process has used, on all its threads, user and kernel.
double ProcessCpuSeconds() {
  timespec ts{};
  ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// CPU per thread wake-up: two threads hand a turn back and forth, each
// sleeping until the other wakes it.
double ThreadHandOffMicros() {
  constexpr int kRounds = 5000;
  absl::Mutex mu;
  int turn = 0;  // even: ping's, odd: pong's
  const double cpu0 = ProcessCpuSeconds();
  std::thread pong([&] {
    for (int i = 0; i < kRounds; ++i) {
      absl::MutexLock lock(&mu);
      mu.Await(absl::Condition(+[](int* t) { return *t % 2 == 1; }, &turn));
      ++turn;
    }
  });
  for (int i = 0; i < kRounds; ++i) {
    absl::MutexLock lock(&mu);
    ++turn;
    mu.Await(absl::Condition(+[](int* t) { return *t % 2 == 0; }, &turn));
  }
  pong.join();
  return 1e6 * (ProcessCpuSeconds() - cpu0) / (2 * kRounds);
}

// Loopback TCP, one stream: its bandwidth and what a byte costs in CPU
// (both ends' threads, kernel time included: on loopback the receiving
// side's protocol work runs in the sender's system call).
struct TcpBaseline {
  double bytes_per_s = 0;
  double cpu_s_per_byte = 0;
};

TcpBaseline LoopbackTcp(size_t total) {
  int listener = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (listener < 0 || ::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) != 0 ||
      ::listen(listener, 1) != 0) {
    Fail("loopback TCP baseline: listening on 127.0.0.1", std::strerror(errno));
  }
  size_t got = 0;  // written by the reader, read after it is joined
  std::thread reader([&] {
    int c = ::accept(listener, nullptr, nullptr);
    std::vector<char> buf(1 << 20);
    while (c >= 0 && got < total) {
      ssize_t n = ::read(c, buf.data(), buf.size());
      if (n <= 0) break;
      got += n;
    }
    if (c >= 0) ::close(c);
  });
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  if (s < 0 || ::connect(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    Fail("loopback TCP baseline: connecting to the listener", std::strerror(errno));
  }
  std::vector<char> buf(1 << 20, 'x');
  const double cpu0 = ProcessCpuSeconds();
  auto t0 = Clock::now();
  size_t sent = 0;
  while (sent < total) {
    ssize_t n = ::write(s, buf.data(), std::min(buf.size(), total - sent));
    if (n <= 0) break;
    sent += n;
  }
  ::close(s);
  reader.join();
  double dt = Seconds(t0, Clock::now());
  const double cpu = ProcessCpuSeconds() - cpu0;
  ::close(listener);
  if (sent < total || got < total) {
    Fail("loopback TCP baseline",
         absl::StrCat("sent ", sent, " and received ", got, " of ", total, " bytes"));
  }
  return {total / dt, cpu / total};
}

// ---- in-process pipeserve ---------------------------------------------------

// Channels of one cluster member (plaintext on loopback, as the local
// launcher's). Each in-process server and the coordinator get their own,
// as separate processes would: a shared set would put their streams to
// one address on one HTTP/2 connection.
std::shared_ptr<StageChannels> Channels() { return *StageChannels::Create({}); }

struct StageServer {
  std::unique_ptr<GrpcDialer> dialer;
  std::unique_ptr<StageServerCore> core;
  std::unique_ptr<StageServiceImpl> service;
  std::unique_ptr<grpc::Server> server;
  std::string address;
};

// --device: where the in-process stage servers compute (cpu, cuda:0, ...).
std::string g_device = "cpu";
// --fixtures: an ExampleCode export (DIR/example_code/...) to use instead
// of exporting one with PyTorch here.
std::string g_fixtures;
// --python: the interpreter that runs bench/torch_eager.py (needs torch).
std::string g_python = "/usr/bin/python3";
// Sections that could not run (no ExampleCode export): the exit status is
// 1 when any did.
int g_sections_skipped = 0;

// Whether the stage servers compute on the CPU (--device=auto may pick it).
bool StagesOnCpu() {
  static const bool on_cpu = [] {
    if (g_device == "cpu") return true;
    auto backend = MakeBackend(g_device, {});
    return backend.ok() && (*backend)->Name() == "cpu";
  }();
  return on_cpu;
}

// Whether `what`, a limit timed on the CPU backend, compares with this
// run's stages; where they compute elsewhere, prints why it is left out.
bool CpuLimitApplies(const std::string& what) {
  if (StagesOnCpu()) return true;
  std::printf("%s: not measured for --device=%s (they time the CPU backend)\n", what.c_str(),
              g_device.c_str());
  return false;
}

StageServer StartStageServer(int threads) {
  StageServer s;
  StageServerOptions o;
  o.default_threads = threads;
  if (g_device != "cpu") {
    auto backend = MakeBackend(g_device, {});
    if (!backend.ok()) Fail("--device=" + g_device, backend.status());
    o.backend = std::shared_ptr<ComputeBackend>(*std::move(backend));
  }
  s.dialer = std::make_unique<GrpcDialer>(Channels(), 4);
  s.core = std::make_unique<StageServerCore>(o, s.dialer.get());
  s.service = std::make_unique<StageServiceImpl>(s.core.get(), "");
  grpc::ServerBuilder b;
  int port = 0;
  b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  b.SetMaxReceiveMessageSize(-1);
  SetBulkTransferArgs([&](const char* k, int v) { b.AddChannelArgument(k, v); });
  b.RegisterService(s.service.get());
  s.server = b.BuildAndStart();
  s.address = absl::StrCat("127.0.0.1:", port);
  return s;
}

// One GEMM thread, as each stage server here computes with.
ComputeBackend* CalibrationBackend() {
  static ComputeBackend* cpu = MakeBackend("cpu", {}).value().release();
  return cpu;
}

struct Cluster {
  std::vector<StageServer> stages;
  GrpcStageClient client{Channels(), 8};
  std::unique_ptr<Coordinator> coordinator;
  std::string dir;

  Cluster(int n, int threads_per_stage) {
    std::vector<std::string> addresses;
    for (int i = 0; i < n; ++i) {
      stages.push_back(StartStageServer(threads_per_stage));
      addresses.push_back(stages.back().address);
    }
    dir = absl::StrCat(std::filesystem::temp_directory_path().string(), "/pipeserve_bench_",
                       ::getpid(), "_", n, "_", counter_++);
    CoordinatorOptions co;
    co.calibration_backend = CalibrationBackend();  // for section 7's automatic cuts
    auto store = OpenFileModelStore(dir + "/repo");
    if (!store.ok()) Fail("opening the model store in " + dir, store.status());
    coordinator = std::make_unique<Coordinator>(co, *std::move(store),
                                                MakeStaticLauncher(addresses), &client);
    // Model calls answer UNAVAILABLE until the (empty) store is loaded.
    coordinator->LoadStoredModels();
  }
  ~Cluster() {
    coordinator.reset();
    for (auto& s : stages) {
      s.server->Shutdown(std::chrono::system_clock::now());
      s.core.reset();
    }
    std::filesystem::remove_all(dir);
  }

  // Uploads `m` as `name` with `microbatches` per request (and `o`'s other
  // options); stops the benchmark if that fails.
  void Upload(const std::string& name, const Model& m, int microbatches, UploadOptions o = {}) {
    o.set_microbatches(microbatches);
    auto r = UploadModel(*coordinator, name, m, o);
    if (!r.ok()) Fail(absl::StrCat("uploading \"", name, "\""), r.status());
  }

  static inline int counter_ = 0;
};


// n identity stages on [B, width].
Model IdentityChain(int n, int64_t width) {
  GraphBuilder b;
  b.Input("x", {-1, width});
  std::string prev = "x";
  for (int i = 0; i < n; ++i) {
    if (i > 0) b.Split();
    std::string out = absl::StrCat("h", i);
    b.Op("identity", {prev}, out);
    prev = out;
  }
  b.Output(prev);
  return b.Build();
}

// `layers` linear+relu layers of width w, cut into `stages` equal stages.
Model Mlp(int layers, int stages, int64_t w) {
  GraphBuilder b;
  b.Input("x", {-1, w});
  std::string prev = "x";
  for (int i = 0; i < layers; ++i) {
    if (i > 0 && i % (layers / stages) == 0) b.Split();
    std::string wname = absl::StrCat("l", i, ".weight"), bname = absl::StrCat("l", i, ".bias");
    b.Param(wname, {w, w}).Param(bname, {w});
    b.Op("linear", {prev, wname, bname}, absl::StrCat("lin", i), absl::StrCat("l", i));
    b.Op("relu", {absl::StrCat("lin", i)}, absl::StrCat("r", i));
    prev = absl::StrCat("r", i);
  }
  b.Output(prev);
  return b.Build();
}

// Median microseconds of `iters` requests of `in` to `model`, sent one at
// a time after `warmup` untimed ones.
double InferMedianMicros(Coordinator& c, const std::string& model, const std::vector<Tensor>& in,
                         int iters, int warmup) {
  std::vector<double> t;
  for (int i = 0; i < iters + warmup; ++i) {
    auto t0 = Clock::now();
    auto out = c.Infer(model, in, absl::Now() + absl::Seconds(30));
    if (!out.ok()) {
      Fail(absl::StrCat("request ", i, " to \"", model, "\" (a timed round trip)"), out.status());
    }
    if (i >= warmup) t.push_back(Seconds(t0, Clock::now()) * 1e6);
  }
  return Median(t);
}

// What a load run served: successful requests/s, the p50 and p99 latency
// of the successful requests in ms, and how many failed.
struct LoadResult {
  double rps = 0, p50 = 0, p99 = 0;
  double cpu_us = 0;  // CPU per successful request, where measured
  size_t requests = 0;  // that succeeded
  int failed = 0;
};

// Successful requests/s with `clients` threads each sending `per_client`
// requests (after one warm-up request, not timed, that must succeed).
LoadResult Throughput(Coordinator& c, const std::string& model, const std::vector<Tensor>& in,
                      int clients, int per_client) {
  auto warm = c.Infer(model, in, absl::Now() + absl::Seconds(30));
  if (!warm.ok()) Fail(absl::StrCat("warm-up request to \"", model, "\""), warm.status());
  std::atomic<int> succeeded{0}, failed{0};
  auto t0 = Clock::now();
  std::vector<std::thread> ts;
  for (int k = 0; k < clients; ++k) {
    ts.emplace_back([&] {
      for (int r = 0; r < per_client; ++r) {
        if (c.Infer(model, in, absl::Now() + absl::Seconds(60)).ok()) {
          ++succeeded;
        } else {
          ++failed;
        }
      }
    });
  }
  for (auto& t : ts) t.join();
  LoadResult result;
  result.requests = succeeded;
  result.failed = failed;
  result.rps = succeeded / Seconds(t0, Clock::now());
  return result;
}

// The median rate and p50 and p99 of `runs`, with the requests and
// failures of them all.
LoadResult MedianRate(const std::vector<LoadResult>& runs) {
  std::vector<double> rps, p50, p99;
  LoadResult median;
  for (const LoadResult& r : runs) {
    rps.push_back(r.rps);
    p50.push_back(r.p50);
    p99.push_back(r.p99);
    median.requests += r.requests;
    median.failed += r.failed;
  }
  median.rps = Median(rps);
  median.p50 = Median(p50);
  median.p99 = Median(p99);
  return median;
}

void HopLatency() {
  std::printf("\n1. Hop latency, 16x512 float32 (32 KiB), median of 500 round trips\n");
  EchoService echo;
  grpc::ServerBuilder b;
  int port = 0;
  b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  b.RegisterService(&echo);
  auto server = b.BuildAndStart();
  double ping = PingPongMicros(absl::StrCat("127.0.0.1:", port), 16 * 512 * 4, 500);
  Tensor x = RandomTensor({16, 512}, 1);
  Cluster one(1, 1), two(2, 1);
  one.Upload("id", IdentityChain(1, 512), 1);
  two.Upload("id", IdentityChain(2, 512), 1);
  double t1 = InferMedianMicros(*one.coordinator, "id", {x}, 500, 20);
  double t2 = InferMedianMicros(*two.coordinator, "id", {x}, 500, 20);
  std::printf("%-44s %10s\n", "", "us");
  std::printf("%-44s %10.1f\n", "plain gRPC bidi ping-pong (baseline)", ping);
  std::printf("%-44s %10.1f  (%.2fx ping-pong)\n", "coordinator -> 1 identity stage -> back", t1,
              t1 / ping);
  std::printf("%-44s %10.1f  (%.2fx ping-pong)\n", "coordinator -> 2 identity stages -> back", t2,
              t2 / ping);
  std::printf("%-44s %10.1f  (%.2fx ping-pong; target <= 1.5x)\n", "added by one more stage hop",
              t2 - t1, (t2 - t1) / ping);
  server->Shutdown(std::chrono::system_clock::now());
}

void LargeActivation() {
  std::printf("\n2. 16 MiB activation across a hop\n");
  double tcp = LoopbackTcp(size_t{2} << 30).bytes_per_s;
  Cluster one(1, 1);
  one.Upload("id", IdentityChain(1, 1024), 1);
  Tensor x = RandomTensor({4096, 1024}, 2);  // 16 MiB
  FrameReceiveStats before = GetFrameReceiveStats();
  double t = InferMedianMicros(*one.coordinator, "id", {x}, 40, 20) / 1e6;
  FrameReceiveStats after = GetFrameReceiveStats();
  double copied = after.copied_bytes - before.copied_bytes;
  double wrapped = after.wrapped_bytes - before.wrapped_bytes;
  // One round trip = the activation crosses two hops (to the stage, back).
  double per_hop = 2.0 * x.byte_size() / t;
  std::printf("%-44s %10.2f GB/s\n", "loopback TCP, one stream (baseline)", tcp / 1e9);
  std::printf("%-44s %10.2f ms\n", "round trip through 1 identity stage", t * 1e3);
  std::printf("%-44s %10.2f GB/s  (%.0f%% of TCP; target >= 80%%)\n",
              "per hop (2 x 16 MiB / round trip)", per_hop / 1e9, 100 * per_hop / tcp);
  std::printf("%-44s %10.0f%%\n", "received tensor bytes copied (rest wrapped)",
              100 * copied / std::max(1.0, copied + wrapped));
  // gRPC reads the socket into slices of its own size; a tensor that
  // spans two of them cannot be wrapped.
  std::printf("%-44s %10.0f KiB  (a larger tensor is copied once)\n",
              "largest slice gRPC handed over (this process)", after.largest_slice / 1024.0);
}

// Tensor bytes this process received between two snapshots.
uint64_t ReceivedBytes(const FrameReceiveStats& before, const FrameReceiveStats& after) {
  return after.copied_bytes - before.copied_bytes + after.wrapped_bytes - before.wrapped_bytes;
}

// Median seconds of `m` run in this process on one thread of the CPU
// backend (every stage one after another, `chunks` microbatches, no
// transport): what the compute alone costs on the CPU.
double ComputeOnlySeconds(const Model& m, const std::vector<Tensor>& in, int chunks, int runs) {
  const std::string what = absl::StrCat("compute-only run (CPU, ", chunks, " microbatches)");
  auto cpu = MakeBackend("cpu", {});
  if (!cpu.ok()) Fail(what + ": the CPU backend", cpu.status());
  auto plan = Partition(m.graph, {});
  if (!plan.ok()) Fail(what + ": partitioning", plan.status());
  auto pipe = LocalPipeline::Create(m, *plan, **cpu, {chunks});
  if (!pipe.ok()) Fail(what + ": compiling", pipe.status());
  std::vector<double> seconds;
  for (int i = 0; i < runs + runs / 5; ++i) {  // the first fifth warms up
    auto t0 = Clock::now();
    auto out = (*pipe)->Run(in);
    const double dt = Seconds(t0, Clock::now());
    if (!out.ok()) Fail(absl::StrCat(what, " ", i), out.status());
    if (i >= runs / 5) seconds.push_back(dt);
  }
  return Median(seconds);
}

// The most `stages` single-threaded stages could serve, in requests/s,
// when a request costs `compute_s` of compute in all and its transport
// `transport_cpu_s` of CPU: the stages' cores' time over the compute, and
// the machine's over compute and transport together.
double Ceiling(int stages, double compute_s, double transport_cpu_s) {
  return std::min(ComputeCores(stages) / compute_s,
                  MachineCores() / (compute_s + transport_cpu_s));
}

void Pipelining() {
  std::printf("\n3. Pipelining: 4 linear+ReLU layers of 1024, batch 256 in 4 microbatches,\n"
              "   8 clients (up to 32 microbatches in flight), one GEMM thread per stage\n");
  Tensor x = RandomTensor({256, 1024}, 3);
  Cluster one(1, 1), two(2, 1);
  one.Upload("mlp", Mlp(4, 1, 1024), 4);
  two.Upload("mlp", Mlp(4, 2, 1024), 4);
  // Alternating runs, medians: a single short run on this VM swings by
  // 10% either way.
  std::vector<LoadResult> r1s, r2s;
  uint64_t bytes = 0;  // tensor bytes received in the 2-stage runs
  for (int i = 0; i < 3; ++i) {
    r1s.push_back(Throughput(*one.coordinator, "mlp", {x}, 8, 10));
    const FrameReceiveStats before = GetFrameReceiveStats();
    r2s.push_back(Throughput(*two.coordinator, "mlp", {x}, 8, 10));
    const FrameReceiveStats after = GetFrameReceiveStats();
    bytes += ReceivedBytes(before, after);
  }
  const LoadResult r1 = MedianRate(r1s), r2 = MedianRate(r2s);
  std::printf("%-44s %10.1f req/s%s\n", "1 stage (baseline)", r1.rps,
              FailureNote(r1.failed, r1.requests).c_str());
  std::printf("%-44s %10.1f req/s  (%.2fx; target >= 1.85x)%s\n", "2 stages", r2.rps,
              r2.rps / std::max(r1.rps, 1e-9), FailureNote(r2.failed, r2.requests).c_str());
  if (!CpuLimitApplies("compute-only rate and 2 stages' TCP ceiling")) return;
  // The 1-stage run computes on one core and moves its bytes on another;
  // 2 stages compute on two, and on a 2-core machine their transport
  // takes its CPU from them. The most 2 stages could serve (Ceiling): each
  // request's compute (in process, one thread) plus loopback TCP's CPU for
  // the bytes it sends across the 3 hops (both measured in this run).
  const double c = ComputeOnlySeconds(Mlp(4, 1, 1024), {x}, 4, 20);
  const TcpBaseline tcp = LoopbackTcp(size_t{1} << 30);
  const double per_request = static_cast<double>(bytes) / (3 * (8 * 10 + 1));  // + warm-up
  const double ceiling = Ceiling(2, c, per_request * tcp.cpu_s_per_byte);
  std::printf("%-44s %10.1f req/s\n", "compute only, one core", 1 / c);
  std::printf("%-44s %10.1f req/s  (%.2fx the 1-stage run)\n",
              absl::StrCat("2 stages' ceiling, ", CoresLabel(MachineCores()), ": compute + TCP")
                  .c_str(),
              ceiling, ceiling / std::max(r1.rps, 1e-9));
}


// The seed's ExampleCode at batch 256 (exported here with PyTorch unless
// --fixtures gave an export).
struct ExampleCode {
  Model model;
  Tensor x, y;
};

std::optional<ExampleCode> LoadExampleCode() {
  std::string dir = g_fixtures;
  if (dir.empty()) {
    dir = absl::StrCat(std::filesystem::temp_directory_path().string(), "/pipeserve_bench_ec_",
                       ::getpid());
    std::string cmd = absl::StrCat(g_python, " tests/pytorch/make_fixtures.py --out ", dir,
                                   " --case example_code --batch 256 > /dev/null");
    if (std::system(cmd.c_str()) != 0) {
      std::printf("exporting ExampleCode failed (%s); section skipped\n", cmd.c_str());
      ++g_sections_skipped;
      return std::nullopt;
    }
  }
  absl::StatusOr<Fixture> f = LoadFixture(dir, "example_code");  // inputs x, y
  if (g_fixtures.empty()) std::filesystem::remove_all(dir);
  if (!f.ok()) {
    std::printf("cannot load ExampleCode from %s; section skipped\n", dir.c_str());
    ++g_sections_skipped;
    return std::nullopt;
  }
  return ExampleCode{std::move(f->model), std::move(f->inputs[0]), std::move(f->inputs[1])};
}

// Requests the served ExampleCode run sends (4 clients).
constexpr int kE2eRequests = 400;

// Median latency in ms of 30 requests to `model`, sent one at a time.
double LatencyMs(Coordinator& c, const std::string& model, const std::vector<Tensor>& in) {
  return InferMedianMicros(c, model, in, 30, 0) / 1e3;
}

// Microbatches the stages of `model` computed so far, and program runs.
std::pair<uint64_t, uint64_t> Computed(Cluster& cluster, const std::string& model) {
  std::pair<uint64_t, uint64_t> frames_runs{0, 0};
  for (StageServer& server : cluster.stages) {
    for (const StageKey& k : server.core->Keys()) {
      if (k.model() != model) continue;
      auto st = server.core->Stats(k);
      if (!st.ok()) continue;
      frames_runs.first += st->frames_processed();
      frames_runs.second += st->program_runs();
    }
  }
  return frames_runs;
}

// Section 4's compute-only limits and TCP ceiling, for stages on the CPU:
// every stage's program run in this process, one after another on one
// thread (no transport), so the cores the 4 stages can keep busy could do
// that many times as many batches.
void PrintE2eLimits(const ExampleCode& ec, const LoadResult& served16,
                    const LoadResult& served4, double bytes_per_batch) {
  if (!CpuLimitApplies("compute-only limit and TCP ceiling")) return;
  const int cores = ComputeCores(4);
  const double c16 = ComputeOnlySeconds(ec.model, {ec.x, ec.y}, 16, 50);
  const double c4 = ComputeOnlySeconds(ec.model, {ec.x, ec.y}, 4, 50);
  const double limit16 = cores / c16, limit4 = cores / c4;
  std::printf("%-44s %10.1f  (served: %.0f%% of it; target >= 80%%)\n",
              absl::StrCat("compute-only limit, 16 microbatches, ", CoresLabel(cores)).c_str(),
              limit16, 100 * served16.rps / limit16);
  std::printf("%-44s %10.1f  (served: %.0f%% of it)\n",
              absl::StrCat("compute-only limit, 4 microbatches, ", CoresLabel(cores)).c_str(),
              limit4, 100 * served4.rps / limit4);
  // What moving the batch's bytes over loopback TCP costs in CPU alone,
  // at the rate one plain TCP stream pays in this run, added to the
  // compute (at the faster of 16- and 64-row runs: stages join up to 64
  // rows): the most any transport over TCP could serve on these cores
  // (gRPC framing, wake-ups and the receive copy come on top).
  const TcpBaseline tcp = LoopbackTcp(size_t{1} << 30);
  const double ceiling = Ceiling(4, std::min(c16, c4), bytes_per_batch * tcp.cpu_s_per_byte);
  std::printf("%-44s %10.2f MiB  (TCP: %.2f ms of CPU per MiB)\n",
              "tensor bytes crossing the 5 hops, per batch", bytes_per_batch / (1 << 20),
              tcp.cpu_s_per_byte * (1 << 20) * 1e3);
  std::printf("%-44s %10.1f  (%s; %.0f%% of the limit; served: %.0f%% of it)\n",
              "ceiling: compute + TCP's CPU for those bytes", ceiling,
              CoresLabel(MachineCores()).c_str(), 100 * ceiling / limit16,
              100 * served16.rps / ceiling);
}

// PyTorch eager on the CPU, at batch 256, measured now (n/a where
// bench/torch_eager.py printed no time; its error is on stderr).
void PrintTorchRows() {
  const std::string run = absl::StrCat(g_python, " bench/torch_eager.py --batch 256 --iters 50");
  const struct {
    const char* name;
    std::string cmd;
  } rows[] = {
      {"PyTorch eager (CPU), 1 thread", run + " --threads 1"},
      {"PyTorch eager (CPU), 2 threads", run + " --threads 2"},
      {"PyTorch eager (CPU), 2 threads, OpenBLAS SkylakeX",
       "OPENBLAS_CORETYPE=SkylakeX " + run + " --threads 2"},
  };
  for (const auto& row : rows) {
    const double ms = TorchMedianMs(row.cmd);
    if (ms > 0) {
      std::printf("%-44s %10.1f %12.2f\n", row.name, 1e3 / ms, ms);
    } else {
      std::printf("%-44s %10s %12s  (bench/torch_eager.py under %s failed)\n", row.name, "n/a",
                  "n/a", g_python.c_str());
    }
  }
}

// How the 4-client run's frames travelled: frames per message, the share
// of received tensor bytes copied, microbatches per stage program run.
void PrintTransferStats(const FrameReceiveStats& before, const FrameReceiveStats& after,
                        double per_run) {
  std::printf("%-44s %10.2f  (frames queued for one stream go as one message)\n",
              "frames per message received, 4 clients",
              static_cast<double>(after.frames - before.frames) /
                  std::max<uint64_t>(1, after.messages - before.messages));
  std::printf("%-44s %10.0f%%\n", "received tensor bytes copied (rest wrapped)",
              100.0 * (after.copied_bytes - before.copied_bytes) /
                  std::max<uint64_t>(1, ReceivedBytes(before, after)));
  std::printf("%-44s %10.2f  (queued microbatches of a request joined; 1 without)\n",
              "microbatches per stage program run", per_run);
}

void ExampleCodeEndToEnd() {
  std::printf("\n4. ExampleCode, batch 256, 4 stages (%s), 16 microbatches, 4 clients\n",
              g_device == "cpu" ? "1 GEMM thread each" : g_device.c_str());
  std::optional<ExampleCode> ec = LoadExampleCode();
  if (!ec) return;
  const std::vector<Tensor> in = {ec->x, ec->y};
  Cluster four(4, 1);
  // The same-run baseline: stages that compute one microbatch per run
  // (max_batch_rows -1 turns joining off with request batching).
  UploadOptions alone;
  alone.set_max_batch_rows(-1);
  four.Upload("ec", ec->model, 16);
  four.Upload("ec_alone", ec->model, 16, alone);
  Coordinator& c = *four.coordinator;
  const LoadResult served_alone = Throughput(c, "ec_alone", in, 4, 100);
  const FrameReceiveStats before = GetFrameReceiveStats();
  const auto computed_before = Computed(four, "ec");
  const LoadResult served = Throughput(c, "ec", in, 4, kE2eRequests / 4);
  const auto computed_after = Computed(four, "ec");
  const FrameReceiveStats after = GetFrameReceiveStats();
  // Microbatches per program run in the 4-client run.
  const double per_run =
      static_cast<double>(computed_after.first - computed_before.first) /
      std::max<uint64_t>(1, computed_after.second - computed_before.second);
  std::printf("%-44s %10s %12s\n", "", "batch/s", "latency ms");
  std::printf("%-44s %10.1f %12.2f%s\n", "pipeserve, 4 stages over gRPC", served.rps,
              LatencyMs(c, "ec", in), FailureNote(served.failed, served.requests).c_str());
  std::printf("%-44s %10.1f %12.2f  (joining: %.2fx)%s\n",
              "  the same, one microbatch per stage run", served_alone.rps,
              LatencyMs(c, "ec_alone", in), served.rps / std::max(served_alone.rps, 1e-9),
              FailureNote(served_alone.failed, served_alone.requests).c_str());
  // The same with 4 microbatches of 64 rows: a quarter of the hops.
  four.Upload("ec4", ec->model, 4);
  const LoadResult served4 = Throughput(c, "ec4", in, 4, 100);
  std::printf("%-44s %10.1f %12.2f%s\n", "pipeserve, the same with 4 microbatches", served4.rps,
              LatencyMs(c, "ec4", in), FailureNote(served4.failed, served4.requests).c_str());
  PrintE2eLimits(*ec, served, served4,
                 static_cast<double>(ReceivedBytes(before, after)) / (kE2eRequests + 1));
  PrintTorchRows();
  PrintTransferStats(before, after, per_run);
}

// Median of `us` in milliseconds (0 for none).
double MedianMs(std::vector<double> us) { return us.empty() ? 0 : Median(std::move(us)) / 1e3; }

// Serialization alone: encoding and decoding one hop's frame (16 rows of
// the 512-wide activation), as every transfer does once; 300 times, in us.
std::vector<double> CodecMicros() {
  Frame hop;
  hop.header.set_request_id(1);
  hop.Add("h", RandomTensor({16, 512}, 4));
  std::vector<double> codec;
  for (int i = 0; i < 300; ++i) {
    auto t0 = Clock::now();
    grpc::ByteBuffer bb;
    Frame back;
    absl::Status status = FrameToByteBuffer(hop, &bb);
    if (status.ok()) status = FrameFromByteBuffer(bb, &back);
    if (!status.ok()) Fail("encoding and decoding a 16x512 frame (timed alone)", status);
    codec.push_back(Seconds(t0, Clock::now()) * 1e6);
  }
  return codec;
}

// What traced requests recorded: span durations per (stage, what) in us,
// each successful request's latency and its busiest stage's compute, and
// how many requests failed.
struct Traces {
  std::map<std::pair<int, std::string>, std::vector<double>> spans;
  std::vector<double> latency, busiest;
  size_t succeeded = 0;
  int failed = 0;
};

// Adds one request's `trace` (of `stages` stages) to `traces`.
void AddTrace(const std::vector<TraceSpan>& trace, int stages, Traces& traces) {
  std::vector<double> compute(stages, 0);
  // Microbatches computed in one joined run share its compute span: count
  // each run once.
  std::set<std::tuple<int, int, int64_t>> runs;
  for (const TraceSpan& t : trace) {
    if (t.what() == "request") {
      traces.latency.push_back(t.duration_us());
      continue;
    }
    if (t.what() == "compute") {
      if (!runs.insert({t.stage(), t.replica(), t.start_us()}).second) continue;
      compute[t.stage()] += t.duration_us();
    }
    traces.spans[{t.stage(), t.what()}].push_back(t.duration_us());
  }
  traces.busiest.push_back(*std::max_element(compute.begin(), compute.end()));
  ++traces.succeeded;
}

// `clients` threads each sending 20 traced requests of `in` to `d`.
Traces TracedRequests(Coordinator& c, const std::shared_ptr<Deployment>& d,
                      const std::vector<Tensor>& in, int clients, int stages) {
  std::mutex mu;
  Traces traces;
  auto run = [&] {
    for (int r = 0; r < 20; ++r) {
      std::vector<TraceSpan> trace;
      RequestOptions traced;
      traced.deadline = absl::Now() + absl::Seconds(60);
      traced.trace = &trace;
      auto out = c.InferOn(d, in, traced);
      std::lock_guard<std::mutex> lock(mu);
      if (out.ok()) {
        AddTrace(trace, stages, traces);
      } else {
        ++traces.failed;
      }
    }
  };
  std::vector<std::thread> ts;
  for (int k = 0; k < clients; ++k) ts.emplace_back(run);
  for (auto& t : ts) t.join();
  return traces;
}

void PrintTraces(Traces& t, int clients, int stages, const std::vector<double>& codec) {
  std::printf("\n   %d client%s, %zu requests%s\n", clients, clients == 1 ? "" : "s", t.succeeded,
              FailureNote(t.failed, t.succeeded).c_str());
  std::printf("   %-34s %12s %10s %10s\n", "", "transfer in", "queue", "compute");
  for (int i = 0; i < stages; ++i) {
    std::printf("   %-34s %12.3f %10.3f %10.3f\n", absl::StrCat("stage ", i).c_str(),
                MedianMs(t.spans[{i, "transfer"}]), MedianMs(t.spans[{i, "queue"}]),
                MedianMs(t.spans[{i, "compute"}]));
  }
  std::printf("   %-34s %12.3f\n", "coordinator: send into stage 0",
              MedianMs(t.spans[{-1, "send"}]));
  std::printf("   %-34s %12.3f\n", "last stage -> coordinator", MedianMs(t.spans[{-1, "receive"}]));
  std::printf("   %-34s %12.3f   (in every transfer)\n", "serialization alone (encode+decode)",
              MedianMs(codec));
  const double l = MedianMs(t.latency), b = MedianMs(t.busiest);
  std::printf("   request latency %.2f ms; the busiest stage computes %.2f ms of it (%.0f%%)\n", l,
              b, 100 * b / std::max(l, 1e-9));
}

void TimeBreakdown() {
  std::printf("\n5. Where a served request's time goes: ExampleCode, batch 256, 4 stages,\n"
              "   16 microbatches, traced requests (medians per microbatch, ms; compute:\n"
              "   per program run, which may join queued microbatches)\n");
  std::optional<ExampleCode> ec = LoadExampleCode();
  if (!ec) return;
  Cluster four(4, 1);
  four.Upload("ec", ec->model, 16);
  const int stages = 4;
  const std::vector<double> codec = CodecMicros();
  auto d = four.coordinator->Find("ec");
  if (!d.ok()) Fail("finding the uploaded \"ec\"", d.status());
  const std::vector<Tensor> in = {ec->x, ec->y};
  for (int clients : {1, 4}) {
    TracedRequests(*four.coordinator, *d, in, 1, stages);  // warm up (and discarded)
    Traces traces = TracedRequests(*four.coordinator, *d, in, clients, stages);
    PrintTraces(traces, clients, stages, codec);
  }
}

// `clients` threads sending `in` to `model` for `length`: successful
// requests/s, their p50 and p99 latency in ms, and the failures.
LoadResult ClosedLoop(Coordinator& c, const std::string& model, const std::vector<Tensor>& in,
                      int clients, absl::Duration length) {
  std::mutex mu;
  std::vector<double> ms;
  std::atomic<int> failed{0};
  const absl::Time end = absl::Now() + length;
  std::vector<std::thread> ts;
  auto t0 = Clock::now();
  for (int k = 0; k < clients; ++k) {
    ts.emplace_back([&] {
      std::vector<double> mine;  // successful requests' latency
      while (absl::Now() < end) {
        auto a = Clock::now();
        if (!c.Infer(model, in, absl::Now() + absl::Seconds(30)).ok()) {
          ++failed;
          continue;
        }
        mine.push_back(Seconds(a, Clock::now()) * 1e3);
      }
      std::lock_guard<std::mutex> lock(mu);
      ms.insert(ms.end(), mine.begin(), mine.end());
    });
  }
  for (auto& t : ts) t.join();
  LoadResult r;
  r.requests = ms.size();
  r.rps = ms.size() / Seconds(t0, Clock::now());
  std::sort(ms.begin(), ms.end());
  r.p50 = ms.empty() ? 0 : ms[ms.size() / 2];
  r.p99 = ms.empty() ? 0 : ms[std::min(ms.size() - 1, ms.size() * 99 / 100)];
  r.failed = failed;
  return r;
}

// A row of section 6's table: `r`, then `note`, then its failures.
void PrintBatchingRow(const std::string& name, const LoadResult& r, const std::string& note) {
  std::printf("%-44s %10.1f %9.2f %9.2f%s%s\n", name.c_str(), r.rps, r.p50, r.p99, note.c_str(),
              FailureNote(r.failed, r.requests).c_str());
}

// What 5x would take: a request's CPU, against what it cannot do
// without: its compute at the merged size (`per_merge` rows, in process,
// one thread; CPU stages only) and one thread wake-up (its client's, when
// its answer is in).
void PrintRequestCpu(const ExampleCode& ec, const LoadResult& alone, const LoadResult& merged,
                     double per_merge) {
  std::printf("%-44s %10.1f us  (batching: %.1f us; 5x needs <= %.1f us)\n",
              "CPU per request, no batching", alone.cpu_us, merged.cpu_us, alone.cpu_us / 5);
  if (CpuLimitApplies("  compute alone per row")) {
    const int64_t rows = std::clamp<int64_t>(std::llround(per_merge), 1, ec.x.dim(0));
    const double per_row_us =
        1e6 / rows *
        ComputeOnlySeconds(ec.model, {ec.x.SliceRows(0, rows), ec.y.SliceRows(0, rows)}, 1, 180);
    std::printf("%-44s %10.1f us\n",
                absl::StrCat("  compute alone at ", rows, " rows, per row").c_str(), per_row_us);
  }
  std::printf("%-44s %10.1f us\n", "  one thread wake-up (hand-off round trip / 2)",
              ThreadHandOffMicros());
}

void DynamicBatching() {
  std::printf("\n6. Dynamic batching: 64 clients, each sending batch-1 ExampleCode requests\n"
              "   one after another for 5 s, 4 stages (a merged request goes as one microbatch)\n");
  std::optional<ExampleCode> ec = LoadExampleCode();
  if (!ec) return;
  Cluster four(4, 1);
  UploadOptions off;
  off.set_max_batch_rows(-1);
  const int cores = MachineCores();
  UploadOptions per_core;
  per_core.set_max_batches_in_flight(cores);  // as many as this machine's cores
  four.Upload("alone", ec->model, 4, off);
  four.Upload("merged", ec->model, 4);
  four.Upload("merged_cores", ec->model, 4, per_core);
  const std::vector<Tensor> one = {ec->x.SliceRows(0, 1), ec->y.SliceRows(0, 1)};
  Coordinator& coordinator = *four.coordinator;
  ClosedLoop(coordinator, "alone", one, 8, absl::Seconds(1));  // warm up
  // CPU per request: with the cores busy in every run, the throughput
  // ratio is the inverse ratio of what a request costs in CPU.
  double cpu0 = ProcessCpuSeconds();
  LoadResult a = ClosedLoop(coordinator, "alone", one, 64, absl::Seconds(5));
  double cpu1 = ProcessCpuSeconds();
  LoadResult b = ClosedLoop(coordinator, "merged", one, 64, absl::Seconds(5));
  double cpu2 = ProcessCpuSeconds();
  LoadResult c = ClosedLoop(coordinator, "merged_cores", one, 64, absl::Seconds(5));
  a.cpu_us = 1e6 * (cpu1 - cpu0) / std::max<size_t>(1, a.requests);
  b.cpu_us = 1e6 * (cpu2 - cpu1) / std::max<size_t>(1, b.requests);
  const double base = std::max(a.rps, 1e-9);
  std::printf("%-44s %10s %9s %9s\n", "", "req/s", "p50 ms", "p99 ms");
  PrintBatchingRow("no batching (baseline)", a, "");
  PrintBatchingRow("batching, defaults (64 rows, 4 in flight)", b,
                   absl::StrFormat("  (%.2fx; target >= 5x at no worse p99)", b.rps / base));
  PrintBatchingRow(absl::StrCat("batching, ", cores, " in flight (= cores)"), c,
                   absl::StrFormat("  (%.2fx)", c.rps / base));
  auto d = coordinator.Find("merged");
  const double per_merge =
      d.ok() && (*d)->batches() ? static_cast<double>((*d)->merged_requests()) / (*d)->batches()
                                : 0.0;
  std::printf("%-44s %10.1f requests per merged request\n", "", per_merge);
  PrintRequestCpu(*ec, a, b, per_merge);
}

// `wide` linear+ReLU layers of 1024, then `narrow` of 32, no cut points.
Model WideThenNarrow(int wide, int narrow) {
  GraphBuilder b;
  b.Input("x", {-1, 1024});
  std::string prev = "x";
  for (int i = 0; i < wide + narrow; ++i) {
    const int64_t in = i <= wide ? 1024 : 32, out = i < wide ? 1024 : 32;
    std::string w = absl::StrCat("l", i, ".weight"), bias = absl::StrCat("l", i, ".bias");
    b.Param(w, {out, in}).Param(bias, {out});
    b.Op("linear", {prev, w, bias}, absl::StrCat("lin", i), absl::StrCat("l", i));
    b.Op("relu", {absl::StrCat("lin", i)}, absl::StrCat("r", i));
    prev = absl::StrCat("r", i);
  }
  b.Output(prev);
  return b.Build();
}

// The node times the measured cut of `name` used (kept with its upload in
// the model store under `dir`).
std::vector<double> MeasuredNodeSeconds(const std::string& dir, const std::string& name) {
  auto store = OpenFileModelStore(dir + "/repo");
  if (!store.ok()) Fail("opening the model store of section 7", store.status());
  auto stored = (*store)->List();
  if (!stored.ok()) Fail("listing the model store of section 7", stored.status());
  std::vector<double> node_seconds;
  for (const StoredModel& s : *stored) {
    if (s.name == name) {
      node_seconds.assign(s.options.profile().seconds().begin(),
                          s.options.profile().seconds().end());
    }
  }
  return node_seconds;
}

// One row per stage of `plan`: its compute nodes, their time predicted by
// `node_seconds`, and the time its stage server measured (`served`).
void PrintStageRows(const Plan& plan, const std::vector<double>& node_seconds,
                    const std::vector<double>& served) {
  size_t first = 0;  // the stage's first compute node
  for (const Stage& s : plan.stages()) {
    size_t nodes = 0;
    for (const Node& n : s.graph().nodes()) nodes += n.op() != "param";
    double predicted = 0;
    for (size_t i = first; i < first + nodes && i < node_seconds.size(); ++i) {
      predicted += node_seconds[i];
    }
    first += nodes;
    std::printf("%-30s %7zu %14.3f %14.3f\n", absl::StrCat("  stage ", s.index()).c_str(), nodes,
                predicted * 1e3,
                static_cast<size_t>(s.index()) < served.size() ? served[s.index()] * 1e3 : 0.0);
  }
}

void MeasuredPartitioning() {
  constexpr int kWide = 4, kNarrow = 600;
  std::printf("\n7. Partitioning: %d linear+ReLU layers of 1024 then %d of 32 (no cut points),\n"
              "   cut into 2 stages; batch 256 in 16 microbatches, 8 clients, medians of 3\n"
              "   alternating 3 s runs, one GEMM thread per stage. Times are per 16-row\n"
              "   microbatch (a loaded stage computes up to 4 at once).\n",
              kWide, kNarrow);
  const Model m = WideThenNarrow(kWide, kNarrow);
  const Tensor x = RandomTensor({256, 1024}, 5);
  Cluster one(1, 1), two(2, 1);
  UploadOptions measured, estimated;
  measured.set_num_stages(2);
  measured.set_balance(UploadOptions::BALANCE_MEASURED);
  estimated.set_num_stages(2);
  estimated.set_balance(UploadOptions::BALANCE_ESTIMATED);
  one.Upload("whole", m, 16);
  two.Upload("measured", m, 16, measured);
  two.Upload("estimated", m, 16, estimated);
  // The measured cut's node times predict the estimate's cut too.
  const std::vector<double> node_seconds = MeasuredNodeSeconds(two.dir, "measured");
  ClosedLoop(*one.coordinator, "whole", {x}, 8, absl::Seconds(1));  // warm up
  LoadResult base = ClosedLoop(*one.coordinator, "whole", {x}, 8, absl::Seconds(5));
  std::printf("%-30s %7s %14s %14s %9s %9s\n", "", "nodes", "predicted ms", "measured ms",
              "req/s", "p99 ms");
  std::printf("%-30s %7d %14s %14s %9.1f %9.2f%s\n", "1 stage (baseline)", 2 * (kWide + kNarrow),
              "", "", base.rps, base.p99, FailureNote(base.failed, base.requests).c_str());
  // Alternating runs, medians: one run on this VM swings by 15%.
  const char* const names[2] = {"estimated", "measured"};
  std::vector<LoadResult> runs[2];
  for (const char* name : names) ClosedLoop(*two.coordinator, name, {x}, 8, absl::Seconds(1));
  for (int round = 0; round < 3; ++round) {
    for (int k = 0; k < 2; ++k) {
      runs[k].push_back(ClosedLoop(*two.coordinator, names[k], {x}, 8, absl::Seconds(3)));
    }
  }
  double rps[2] = {0, 0};
  for (int k = 0; k < 2; ++k) {
    const LoadResult r = MedianRate(runs[k]);
    rps[k] = r.rps;
    auto info = two.coordinator->GetModel(names[k]);
    if (!info.ok()) Fail(absl::StrCat("looking up \"", names[k], "\"'s plan"), info.status());
    std::printf("%-30s %7s %14s %14s %9.1f %9.2f  (%.2fx the baseline)%s\n",
                k == 1 ? "cut by measured node times" : "cut by estimate (as before)", "", "", "",
                r.rps, r.p99, r.rps / std::max(base.rps, 1e-9),
                FailureNote(r.failed, r.requests).c_str());
    PrintStageRows(*info->plan, node_seconds, two.coordinator->MeasuredComputeSeconds(names[k]));
  }
  std::printf("%-30s %7s %14s %14s %9s  %.2fx (target: > 1x)\n", "measured vs estimate", "", "",
              "", "", rps[1] / std::max(1e-9, rps[0]));
}

}  // namespace
}  // namespace pipeserve

int main(int argc, char** argv) {
  pipeserve::StartServerProcess(argv);  // as the coordinator and stage servers do
  std::string only;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--device=", 0) == 0) {
      pipeserve::g_device = a.substr(9);
    } else if (a.rfind("--fixtures=", 0) == 0) {
      pipeserve::g_fixtures = a.substr(11);
    } else if (a.rfind("--python=", 0) == 0) {
      pipeserve::g_python = a.substr(9);
    } else {
      only = a;
    }
  }
  std::printf("stage servers compute on: %s\n", pipeserve::g_device.c_str());
  if (only.empty() || only == "hop") pipeserve::HopLatency();
  if (only.empty() || only == "large") pipeserve::LargeActivation();
  if (only.empty() || only == "pipeline") pipeserve::Pipelining();
  if (only.empty() || only == "e2e") pipeserve::ExampleCodeEndToEnd();
  if (only.empty() || only == "breakdown") pipeserve::TimeBreakdown();
  if (only.empty() || only == "batching") pipeserve::DynamicBatching();
  if (only.empty() || only == "partition") pipeserve::MeasuredPartitioning();
  if (pipeserve::g_sections_skipped > 0) {
    std::printf("\nbench/serving: %d section(s) did not run (see above)\n",
                pipeserve::g_sections_skipped);
    return 1;
  }
  return 0;
}
