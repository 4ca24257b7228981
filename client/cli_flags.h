// A small flag parser for the pipeserve CLI's subcommands: each subcommand
// declares its flags with help text, so `pipeserve SUB --help` can list them.
//
//   FlagSet flags("plan", "Print how a model is cut into stages.");
//   flags.Add("model", "PATH", "model file (.psm)", /*required=*/true);
//   flags.Add("num_stages", "K", "stages for automatic cutting", false, "0");
//   absl::Status s = flags.Parse(args);   // args after the subcommand
//   std::string path = flags.Get("model");
#ifndef PIPESERVE_CLIENT_CLI_FLAGS_H_
#define PIPESERVE_CLIENT_CLI_FLAGS_H_

#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace pipeserve {

class FlagSet {
 public:
  FlagSet(std::string command, std::string summary);

  // Declares --name. `repeated` flags collect every occurrence.
  void Add(const std::string& name, const std::string& value_name,
           const std::string& help, bool required = false,
           const std::string& default_value = "", bool repeated = false);

  // Parses `--name=value` and `--name value`. kInvalidArgument naming an
  // unknown flag, a missing value or a missing required flag. Sets
  // help_requested() for --help / -h (and then checks nothing else).
  absl::Status Parse(const std::vector<std::string>& args);

  bool help_requested() const { return help_; }
  std::string Help() const;

  std::string Get(const std::string& name) const;
  std::vector<std::string> GetAll(const std::string& name) const;
  absl::StatusOr<int> GetInt(const std::string& name) const;

 private:
  struct Flag {
    std::string value_name, help, default_value;
    bool required = false, repeated = false;
    std::vector<std::string> values;
  };
  std::string command_, summary_;
  std::vector<std::string> order_;
  std::map<std::string, Flag> flags_;
  bool help_ = false;
};

}  // namespace pipeserve

#endif  // PIPESERVE_CLIENT_CLI_FLAGS_H_
