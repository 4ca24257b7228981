#include "server/transport/channels.h"

#include "server/transport/auth.h"

namespace pipeserve {

void SetBulkTransferArgs(const std::function<void(const char*, int)>& set) {
  // Activations are large: read the socket in big chunks (fewer syscalls
  // and slices, so a received tensor is more often one contiguous slice
  // that needs no copy) and let a stream run ahead of flow control.
  set(GRPC_ARG_TCP_READ_CHUNK_SIZE, 4 << 20);
  set(GRPC_ARG_TCP_MIN_READ_CHUNK_SIZE, 256 << 10);
  set(GRPC_ARG_TCP_MAX_READ_CHUNK_SIZE, 64 << 20);
  set(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 << 20);
  set(GRPC_ARG_HTTP2_WRITE_BUFFER_SIZE, 16 << 20);
}

void SetKeepaliveServerArgs(const std::function<void(const char*, int)>& set) {
  // gRPC servers answer pings more often than every 5 minutes with GOAWAY
  // ("too many pings"); the cluster's channels ping every second.
  set(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 500);
  set(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  set(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
}

grpc::ChannelArguments StageChannelArgs() {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  SetBulkTransferArgs([&](const char* k, int v) { args.SetInt(k, v); });
  // A peer that stops answering (a cut link, a frozen node) is found
  // within about 2 s: a ping after 1 s of silence, 1 s to answer. Stage
  // servers accept pings that often (SetKeepaliveServerArgs).
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 1000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 1000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  // A stage server that restarts (a pod rescheduled) is back within
  // seconds; gRPC's default backoff would wait up to two minutes.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  // A pod replaced under the same name has a new address: a failed
  // connection looks the name up again after 1 s, not gRPC's 30.
  args.SetInt(GRPC_ARG_DNS_MIN_TIME_BETWEEN_RESOLUTIONS_MS, 1000);
  return args;
}

absl::StatusOr<std::shared_ptr<StageChannels>> StageChannels::Create(
    const ClusterOptions& options) {
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> creds =
      MakeChannelCredentials(options.tls);
  if (!creds.ok()) return creds.status();
  return std::shared_ptr<StageChannels>(
      new StageChannels(*std::move(creds), options.token));
}

StageChannels::StageChannels(std::shared_ptr<grpc::ChannelCredentials> credentials,
                             std::string token)
    : credentials_(std::move(credentials)), token_(std::move(token)) {}

std::shared_ptr<grpc::Channel> StageChannels::To(const std::string& address) {
  absl::MutexLock lock(&mu_);
  auto it = channels_.find(address);
  if (it != channels_.end()) return it->second;
  // A new address: servers that were replaced (a new port, a new pod) are
  // gone for good, so channels that cannot connect are dropped rather
  // than kept forever (whoever still holds one keeps it alive).
  for (auto c = channels_.begin(); c != channels_.end();) {
    grpc_connectivity_state state = c->second->GetState(/*try_to_connect=*/false);
    if (state == GRPC_CHANNEL_TRANSIENT_FAILURE || state == GRPC_CHANNEL_SHUTDOWN) {
      c = channels_.erase(c);
    } else {
      ++c;
    }
  }
  auto channel = grpc::CreateCustomChannel(address, credentials_, StageChannelArgs());
  channels_[address] = channel;
  return channel;
}

void StageChannels::Prepare(grpc::ClientContext* ctx) const {
  if (!token_.empty()) ctx->AddMetadata(kClusterTokenKey, token_);
}

}  // namespace pipeserve
