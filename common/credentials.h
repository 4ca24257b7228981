// TLS for pipeserve's two kinds of links, built from PEM files:
//
// - clients -> coordinator: the coordinator serves with its certificate
//   (`--tls_cert`/`--tls_key`); clients verify it against their CA.
// - coordinator <-> stage servers, stage -> next stage: mutual TLS with a
//   cluster CA (`--cluster_ca`/`--cluster_cert`/`--cluster_key`). A stage
//   server requires a client certificate signed by the cluster CA, so only
//   the cluster's own members reach it; each member presents its cluster
//   certificate when it dials another.
//
//   TlsFiles files{.cert = "stage.crt", .key = "stage.key", .ca = "ca.crt"};
//   ASSIGN_OR_RETURN(auto server_creds, MakeServerCredentials(files, /*require_client_cert=*/true));
//   ASSIGN_OR_RETURN(auto channel_creds, MakeChannelCredentials(files));
#ifndef PIPESERVE_COMMON_CREDENTIALS_H_
#define PIPESERVE_COMMON_CREDENTIALS_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"

namespace pipeserve {

// Paths of PEM files; empty fields are unused.
struct TlsFiles {
  std::string cert;  // certificate chain
  std::string key;   // its private key
  std::string ca;    // roots to verify the peer with

  // Whether any TLS is configured (a certificate to present).
  bool enabled() const { return !cert.empty(); }
};

// The contents of a file, or kNotFound/kInvalidArgument naming it (empty
// files are refused: an empty CA would trust nothing and fail obscurely).
absl::StatusOr<std::string> ReadSecretFile(const std::string& path);

// A TLS server presenting files.cert/files.key. With
// `require_client_cert`, clients must present a certificate that files.ca
// signed (kInvalidArgument if files.ca is empty). kInvalidArgument when
// cert or key is missing, kNotFound when a file cannot be read.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsFiles& files, bool require_client_cert);

// Channel credentials verifying the server against files.ca (or the
// system's roots when empty) and presenting files.cert/files.key as the
// client certificate when set; plaintext when nothing is set at all.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const TlsFiles& files);

}  // namespace pipeserve

#endif  // PIPESERVE_COMMON_CREDENTIALS_H_
