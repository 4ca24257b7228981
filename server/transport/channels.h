// Channels between the members of a pipeserve cluster (the coordinator and
// its stage servers): one per stage server address, with the cluster's
// credentials (mutual TLS, see credentials.h) and channel arguments tuned
// for activations, plus the cluster token on every call when there is one.
//
//   ASSIGN_OR_RETURN(std::shared_ptr<StageChannels> channels,
//                    StageChannels::Create({.tls = cluster_files, .token = token}));
//   grpc::ClientContext ctx;
//   channels->Prepare(&ctx);
//   StageService::NewStub(channels->To("stage-1.stages:9000"))->GetStageStats(&ctx, ...);
#ifndef PIPESERVE_SERVER_TRANSPORT_CHANNELS_H_
#define PIPESERVE_SERVER_TRANSPORT_CHANNELS_H_

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/grpcpp.h"
#include "common/credentials.h"

namespace pipeserve {

// How one cluster member reaches the others.
struct ClusterOptions {
  // The cluster CA and this member's certificate (presented as the client
  // certificate); nothing set: plaintext.
  TlsFiles tls;
  // Shared secret sent with every StageService call; "" for none.
  std::string token;
};

// Channel arguments for stage traffic: no message size limit (frames carry
// whole activations), keepalive so dead peers are noticed.
grpc::ChannelArguments StageChannelArgs();

// The bulk-transfer tuning of StageChannelArgs, for a ServerBuilder too:
//   SetBulkTransferArgs([&](const char* k, int v) { builder.AddChannelArgument(k, v); });
// Server arguments that let the cluster's channels keep alive with a ping
// every second (StageChannelArgs).
void SetKeepaliveServerArgs(const std::function<void(const char*, int)>& set);

void SetBulkTransferArgs(const std::function<void(const char*, int)>& set);

class StageChannels {
 public:
  // kInvalidArgument or kNotFound (naming the file) when the TLS files
  // cannot be used.
  static absl::StatusOr<std::shared_ptr<StageChannels>> Create(const ClusterOptions& options);

  // The channel (one HTTP/2 connection) to `address`, made on first use.
  // Thread-safe.
  std::shared_ptr<grpc::Channel> To(const std::string& address);

  // Adds the cluster token, if any, to a call's metadata.
  void Prepare(grpc::ClientContext* ctx) const;

 private:
  StageChannels(std::shared_ptr<grpc::ChannelCredentials> credentials, std::string token);

  const std::shared_ptr<grpc::ChannelCredentials> credentials_;
  const std::string token_;
  absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<grpc::Channel>> channels_ ABSL_GUARDED_BY(mu_);
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TRANSPORT_CHANNELS_H_
