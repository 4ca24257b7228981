#include "server/serve.h"

#include <signal.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <thread>

#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"

namespace pipeserve {

namespace {

sigset_t ShutdownSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

}  // namespace

void BlockShutdownSignals() {
  sigset_t set = ShutdownSignals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

int Serve(const std::vector<grpc::Service*>& services, const std::string& host,
          int port, const std::string& port_file, const std::string& name,
          std::function<void(grpc::Server*)> on_started, int max_receive_bytes) {
  BlockShutdownSignals();  // before gRPC starts its threads
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int chosen = 0;
  builder.AddListeningPort(host + ":" + std::to_string(port),
                           grpc::InsecureServerCredentials(), &chosen);
  builder.SetMaxReceiveMessageSize(max_receive_bytes);
  builder.SetMaxSendMessageSize(-1);
  for (grpc::Service* s : services) builder.RegisterService(s);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || chosen == 0) {
    std::cerr << name << ": cannot listen on " << host << ":" << port << "\n";
    return 1;
  }
  if (on_started) on_started(server.get());
  if (!port_file.empty()) {
    // Written then renamed, so a reader never sees a partial number.
    std::string tmp = port_file + ".tmp";
    std::ofstream(tmp) << chosen << "\n";
    std::rename(tmp.c_str(), port_file.c_str());
  }
  std::cerr << name << ": serving on " << host << ":" << chosen << std::endl;

  // Wait on this thread for SIGINT/SIGTERM (blocked everywhere).
  sigset_t set = ShutdownSignals();
  int sig = 0;
  sigwait(&set, &sig);
  std::cerr << name << ": shutting down" << std::endl;
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  return 0;
}

}  // namespace pipeserve
