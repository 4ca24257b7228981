#include "client/cli.h"

#include <algorithm>
#include <chrono>
#include <functional>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "client/cli_flags.h"
#include "common/status_macros.h"
#include "partitioner/partition.h"
#include "partitioner/plan_text.h"
#include "runtime/cpu_backend.h"
#include "runtime/local_pipeline.h"
#include "runtime/model_file.h"
#include "runtime/npy.h"

namespace pipeserve {
namespace {

void AddPartitionFlags(FlagSet& flags) {
  flags.Add("model", "PATH", "model file written by pipeserve.export (.psm)", true);
  flags.Add("num_stages", "K",
            "stages for automatic cutting of a model without cut points", false, "0");
  flags.Add("split", "MODULE:BEGINNING|END",
            "cut at a module (overrides the model's split_spec)", false, "", true);
}

absl::StatusOr<PartitionOptions> PartitionOptionsFrom(const FlagSet& flags) {
  PartitionOptions o;
  ASSIGN_OR_RETURN(o.num_stages, flags.GetInt("num_stages"));
  for (const std::string& s : flags.GetAll("split")) {
    std::vector<std::string> parts = absl::StrSplit(s, ':');
    SplitPoint point;
    if (parts.size() != 2 || !SplitPoint_Parse(parts[1], &point) ||
        point == SPLIT_POINT_UNSPECIFIED) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--split \"", s, "\": expected MODULE:BEGINNING or MODULE:END"));
    }
    o.split_spec[parts[0]] = point;
  }
  return o;
}

absl::Status Plan_(const FlagSet& flags, std::ostream& out) {
  ASSIGN_OR_RETURN(PartitionOptions opts, PartitionOptionsFrom(flags));
  ASSIGN_OR_RETURN(Model model, ReadModelFile(flags.Get("model")));
  ASSIGN_OR_RETURN(Plan plan, Partition(model.graph, opts));
  out << FormatPlan(plan);
  return absl::OkStatus();
}

// Inputs as NAME=PATH, or PATH in the model's input order.
absl::StatusOr<std::vector<Tensor>> LoadInputs(const Graph& graph,
                                               const std::vector<std::string>& args) {
  std::map<std::string, std::string> by_name;
  std::vector<std::string> positional;
  for (const std::string& a : args) {
    size_t eq = a.find('=');
    if (eq == std::string::npos) {
      positional.push_back(a);
    } else {
      by_name[a.substr(0, eq)] = a.substr(eq + 1);
    }
  }
  std::vector<Tensor> inputs;
  size_t next = 0;
  for (const ValueSpec& spec : graph.inputs()) {
    std::string path;
    auto it = by_name.find(spec.name());
    if (it != by_name.end()) {
      path = it->second;
      by_name.erase(it);
    } else if (next < positional.size()) {
      path = positional[next++];
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("no --input for model input \"", spec.name(), "\""));
    }
    ASSIGN_OR_RETURN(Tensor t, ReadNpy(path));
    inputs.push_back(std::move(t));
  }
  if (!by_name.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--input names \"", by_name.begin()->first, "\", which is not a model input"));
  }
  if (next < positional.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "more --input files than the model's ", graph.inputs_size(), " inputs"));
  }
  return inputs;
}

absl::Status RunLocal(const FlagSet& flags, std::ostream& out) {
  ASSIGN_OR_RETURN(PartitionOptions opts, PartitionOptionsFrom(flags));
  ASSIGN_OR_RETURN(Model model, ReadModelFile(flags.Get("model")));
  ASSIGN_OR_RETURN(Plan plan, Partition(model.graph, opts));
  ASSIGN_OR_RETURN(std::vector<Tensor> inputs,
                   LoadInputs(model.graph, flags.GetAll("input")));
  CpuBackendOptions cpu;
  ASSIGN_OR_RETURN(cpu.threads, flags.GetInt("threads"));
  std::unique_ptr<ComputeBackend> backend = MakeCpuBackend(cpu);
  LocalPipelineOptions lp;
  ASSIGN_OR_RETURN(lp.chunks, flags.GetInt("chunks"));
  ASSIGN_OR_RETURN(auto pipe, LocalPipeline::Create(model, plan, *backend, lp));
  out << FormatPlan(plan);
  ASSIGN_OR_RETURN(int repeat, flags.GetInt("repeat"));
  std::vector<Tensor> outputs;
  std::vector<double> ms;
  for (int r = 0; r < std::max(1, repeat); ++r) {
    auto start = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(outputs, pipe->Run(inputs));
    ms.push_back(std::chrono::duration<double, std::milli>(
                     std::chrono::steady_clock::now() - start).count());
  }
  double first = ms[0];
  std::sort(ms.begin(), ms.end());
  out << absl::StrFormat("ran %d stages, %d microbatch(es): first call %.3f ms",
                         plan.stages_size(), lp.chunks, first);
  if (ms.size() > 1) {
    out << absl::StrFormat(", median of %d calls %.3f ms", ms.size(),
                           ms[ms.size() / 2]);
  }
  out << "\n";
  std::string dir = flags.Get("output_dir");
  for (size_t i = 0; i < outputs.size(); ++i) {
    out << "output " << i << " (" << plan.outputs(i).name() << "): "
        << ShapeToString(outputs[i].shape());
    if (!dir.empty()) {
      std::string path = absl::StrCat(dir, "/out_", i, ".npy");
      RETURN_IF_ERROR(WriteNpy(path, outputs[i]));
      out << " -> " << path;
    }
    out << "\n";
  }
  return absl::OkStatus();
}

struct Command {
  std::string summary;
  std::function<void(FlagSet&)> flags;
  std::function<absl::Status(const FlagSet&, std::ostream&)> run;
};

std::map<std::string, Command> Commands() {
  return {
      {"plan",
       {"Print how a model is cut into stages: parameters, and the values\n"
        "crossing each boundary.",
        AddPartitionFlags, Plan_}},
      {"run-local",
       {"Cut a model into stages and run them in this process (the\n"
        "equivalent of torch.distributed.pipelining's pipe(x, y)).",
        [](FlagSet& f) {
          AddPartitionFlags(f);
          f.Add("input", "[NAME=]FILE.npy",
                "a model input (float32 .npy), by name or in input order", true, "",
                true);
          f.Add("chunks", "N", "microbatches per call", false, "1");
          f.Add("threads", "T", "GEMM threads", false, "1");
          f.Add("repeat", "N", "run N times and report the median time", false, "1");
          f.Add("output_dir", "DIR", "write outputs there as out_<i>.npy");
        },
        RunLocal}},
  };
}

void Usage(std::ostream& os) {
  os << "usage: pipeserve COMMAND [flags]   (pipeserve COMMAND --help)\n\ncommands:\n";
  for (const auto& [name, cmd] : Commands()) {
    os << "  " << name << "\t" << cmd.summary.substr(0, cmd.summary.find('\n')) << "\n";
  }
}

}  // namespace

int RunCli(const std::vector<std::string>& args, std::ostream& out,
           std::ostream& err) {
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    Usage(args.empty() ? err : out);
    return args.empty() ? 2 : 0;
  }
  auto commands = Commands();
  auto it = commands.find(args[0]);
  if (it == commands.end()) {
    err << "pipeserve: unknown command \"" << args[0] << "\"\n";
    Usage(err);
    return 2;
  }
  FlagSet flags(it->first, it->second.summary);
  it->second.flags(flags);
  absl::Status parsed =
      flags.Parse(std::vector<std::string>(args.begin() + 1, args.end()));
  if (flags.help_requested()) {
    out << flags.Help();
    return 0;
  }
  if (!parsed.ok()) {
    err << "pipeserve " << parsed.message() << "\n";
    return 2;
  }
  absl::Status s = it->second.run(flags, out);
  if (!s.ok()) {
    err << "pipeserve " << it->first << ": " << s.message() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace pipeserve
