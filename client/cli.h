// The `pipeserve` command line: subcommands over the model file and the
// partitioner (local), and over a coordinator through client/client.h
// (remote; --server defaults to localhost:8001).
//
//   pipeserve plan --model example.psm
//   pipeserve run-local --model example.psm --input x=x.npy --input y=y.npy
//       --chunks 4 --output_dir out/
//   pipeserve upload --server HOST:PORT --name example --model example.psm
//   pipeserve models
//   pipeserve plan --name example
//   pipeserve infer --name example --input x=x.npy --input y=y.npy
//       --output_dir out/
//   pipeserve health
#ifndef PIPESERVE_CLIENT_CLI_H_
#define PIPESERVE_CLIENT_CLI_H_

#include <ostream>
#include <string>
#include <vector>

namespace pipeserve {

// Runs `pipeserve args...` (args[0] is the subcommand), writing results to
// `out` and errors to `err`. Returns the process exit code: 0 success,
// 1 failure, 2 usage error.
int RunCli(const std::vector<std::string>& args, std::ostream& out,
           std::ostream& err);

}  // namespace pipeserve

#endif  // PIPESERVE_CLIENT_CLI_H_
