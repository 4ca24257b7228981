// An in-process stand-in for a pipeserve coordinator, for tests of the
// client library and the CLI: it serves the KServe v2 API, ModelService and
// grpc.health.v1 on a loopback port chosen at run time, with canned
// behaviour instead of a real pipeline.
//
//   std::unique_ptr<FakeServer> server = FakeServer::Start();
//   auto client = Client::Connect(server->address());
//   // model "neg" (inputs x, y) answers each input negated, as neg_<input>
//
// Models:
//   "neg"   inputs x and y (any float32 shape); outputs neg_x, neg_y.
//   "slow"  like "neg" after sleeping 2 s (for deadlines).
//   "bad"   answers an output whose raw bytes do not match its shape.
//   "flaky" like "neg", after failing SetFlakyFailures(n) attempts with
//           UNAVAILABLE (for the client's retries).
//   "count" (Generate) the tokens after the prompt's last, counting up.
//   other   kNotFound `model "<name>" is not known`, from every model RPC.
// Uploads check the CRC-32 and size the client sends, and are listed by
// ListModels as READY (num_stages: the requested count, or 1); a model named
// "reject" is refused (kInvalidArgument) after its first message.
#ifndef PIPESERVE_CLIENT_FAKE_SERVER_H_
#define PIPESERVE_CLIENT_FAKE_SERVER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "proto/pipeserve_service.pb.h"

namespace pipeserve {

class FakeServer {
 public:
  // One upload the server received.
  struct Upload {
    std::string name;
    UploadOptions options;
    int messages = 0;    // stream messages, the first included
    uint64_t bytes = 0;  // data bytes received
    uint32_t crc32 = 0;  // CRC-32 the server computed over them
  };

  // Starts serving on 127.0.0.1 at a free port; dies if that fails.
  static std::unique_ptr<FakeServer> Start();
  ~FakeServer();  // shuts the server down

  std::string address() const;  // "127.0.0.1:PORT"

  std::vector<Upload> uploads() const;
  // The answer to GetPlan for `response.name()` (else kNotFound).
  void SetPlan(const GetPlanResponse& response);
  // ServerReady and the health status of service "".
  void SetServing(bool serving);
  // The next `n` ModelInfer calls to "flaky" fail with UNAVAILABLE; resets
  // the attempt count.
  void SetFlakyFailures(int n);
  // ModelInfer calls to "flaky" since SetFlakyFailures.
  int flaky_attempts() const;
  // The last GenerationService.Generate request received.
  GenerateRequest last_generate_request() const;

 private:
  struct Impl;
  explicit FakeServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_CLIENT_FAKE_SERVER_H_
