#include "client/cli.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "client/cli_flags.h"
#include "client/client.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"
#include "partitioner/calibrate.h"
#include "partitioner/partition.h"
#include "partitioner/plan_text.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/local_pipeline.h"
#include "runtime/model_file.h"
#include "runtime/npy.h"

namespace pipeserve {
namespace {

constexpr char kDefaultServer[] = "localhost:8001";

// ---------------------------------------------------------------------------
// Shared flag helpers.

void AddPartitionFlags(FlagSet& flags, bool model_required = true) {
  flags.Add("model", "PATH", "model file written by pipeserve.export (.psm)",
            model_required);
  flags.Add("num_stages", "K",
            "stages for automatic cutting of a model without cut points", false,
            "0");
  flags.Add("split", "MODULE:BEGINNING|END",
            "cut at a module (overrides the model's split_spec)", false, "",
            true);
}

// --balance and --link_gb_per_s (read by BalanceFlag and LinkFlag).
void AddBalanceFlags(FlagSet& flags, const std::string& default_balance,
                     const std::string& balance_help, const std::string& link_default) {
  flags.Add("balance", "HOW", balance_help, false, default_balance);
  flags.Add("link_gb_per_s", "G",
            absl::StrCat("link bandwidth between stages for measured balancing (0: ",
                         link_default, ")"),
            false, "0");
}

void AddServerFlag(FlagSet& flags) {
  flags.Add("server", "HOST:PORT", "the coordinator's gRPC address", false,
            kDefaultServer);
  flags.Add("token_file", "FILE",
            "file holding the bearer token to send (default: $PIPESERVE_TOKEN)");
  flags.Add("tls_ca", "PEM", "CA the server's certificate must chain to (turns TLS on)");
  flags.Add("tls_cert", "PEM", "client certificate, for servers that require one");
  flags.Add("tls_key", "PEM", "the client certificate's key");
  flags.Add("tls_server_name", "NAME",
            "name the server's certificate must carry, if not the --server host");
}

// Client options from the server flags.
absl::StatusOr<ClientOptions> ClientOptionsFrom(const FlagSet& flags) {
  ClientOptions o;
  o.tls_ca_file = flags.Get("tls_ca");
  o.tls_cert_file = flags.Get("tls_cert");
  o.tls_key_file = flags.Get("tls_key");
  o.tls_server_name = flags.Get("tls_server_name");
  if (std::string f = flags.Get("token_file"); !f.empty()) {
    std::ifstream in(f);
    if (!in) return absl::NotFoundError(absl::StrCat("--token_file: cannot read ", f));
    std::string token((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    o.token = std::string(absl::StripAsciiWhitespace(token));
  } else if (const char* env = std::getenv("PIPESERVE_TOKEN"); env != nullptr) {
    o.token = std::string(absl::StripAsciiWhitespace(env));
  }
  return o;
}

// "MODULE:BEGINNING" or "MODULE:END".
absl::StatusOr<std::pair<std::string, SplitPoint>> ParseSplit(
    const std::string& s) {
  std::vector<std::string> parts = absl::StrSplit(s, ':');
  SplitPoint point;
  if (parts.size() != 2 || !SplitPoint_Parse(parts[1], &point) ||
      point == SPLIT_POINT_UNSPECIFIED) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--split \"", s, "\": expected MODULE:BEGINNING or MODULE:END"));
  }
  return std::make_pair(parts[0], point);
}

absl::StatusOr<PartitionOptions> PartitionOptionsFrom(const FlagSet& flags) {
  PartitionOptions o;
  ASSIGN_OR_RETURN(o.num_stages, flags.GetInt("num_stages"));
  for (const std::string& s : flags.GetAll("split")) {
    ASSIGN_OR_RETURN(auto split, ParseSplit(s));
    o.split_spec[split.first] = split.second;
  }
  return o;
}

// Inputs as NAME=PATH, or PATH in the order of `names` (the model's inputs).
absl::StatusOr<std::vector<Tensor>> LoadInputs(
    const std::vector<std::string>& names,
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
  for (const std::string& name : names) {
    std::string path;
    auto it = by_name.find(name);
    if (it != by_name.end()) {
      path = it->second;
      by_name.erase(it);
    } else if (next < positional.size()) {
      path = positional[next++];
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("no --input for model input \"", name, "\""));
    }
    ASSIGN_OR_RETURN(Tensor t, ReadNpy(path));
    inputs.push_back(std::move(t));
  }
  if (!by_name.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--input names \"", by_name.begin()->first,
                     "\", which is not a model input"));
  }
  if (next < positional.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "more --input files than the model's ", names.size(), " inputs"));
  }
  return inputs;
}

std::string HumanBytes(uint64_t b) {
  if (b >= (uint64_t{1} << 30))
    return absl::StrFormat("%.1f GiB", b / 1073741824.0);
  if (b >= (1u << 20)) return absl::StrFormat("%.1f MiB", b / 1048576.0);
  if (b >= 1024) return absl::StrFormat("%.1f KiB", b / 1024.0);
  return absl::StrCat(b, " B");
}

// An output name as a file name: anything but [A-Za-z0-9_.-] becomes '_',
// and a name made only of dots cannot climb out of the directory.
std::string FileNameFor(const std::string& name) {
  std::string s = name;
  for (char& c : s) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' ||
          c == '.')) {
      c = '_';
    }
  }
  if (s.empty() || s.find_first_not_of('.') == std::string::npos) s = "_" + s;
  return s;
}

// ---------------------------------------------------------------------------
// Local commands: plan --model, run-local.

// --balance: "" (the server's default), measured or estimated.
absl::StatusOr<UploadOptions::Balance> BalanceFlag(const FlagSet& flags) {
  const std::string balance = flags.Get("balance");
  if (balance.empty()) return UploadOptions::BALANCE_DEFAULT;
  if (balance == "measured") return UploadOptions::BALANCE_MEASURED;
  if (balance == "estimated") return UploadOptions::BALANCE_ESTIMATED;
  return absl::InvalidArgumentError(
      absl::StrCat("--balance must be measured or estimated, got \"", balance, "\""));
}

// --link_gb_per_s: a bandwidth >= 0 (0: the default).
absl::StatusOr<double> LinkFlag(const FlagSet& flags) {
  double gbps = 0;
  if (!absl::SimpleAtod(flags.Get("link_gb_per_s"), &gbps) || !(gbps >= 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--link_gb_per_s must be a number >= 0, got \"", flags.Get("link_gb_per_s"), "\""));
  }
  return gbps;
}

absl::Status PlanLocal(const FlagSet& flags, std::ostream& out) {
  ASSIGN_OR_RETURN(PartitionOptions opts, PartitionOptionsFrom(flags));
  ASSIGN_OR_RETURN(UploadOptions::Balance balance, BalanceFlag(flags));
  ASSIGN_OR_RETURN(double gbps, LinkFlag(flags));
  ASSIGN_OR_RETURN(Model model, ReadModelFile(flags.Get("model")));
  ASSIGN_OR_RETURN(Plan plan, Partition(model.graph, opts));
  if (balance == UploadOptions::BALANCE_MEASURED && plan.balance() == kEstimatedBalance) {
    // As a coordinator would: time every node here, then cut by the times.
    std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend({});
    ParamReader read = [&model](const TensorInfo& p) -> absl::StatusOr<Tensor> {
      auto it = model.weights.find(p.fqn());
      if (it == model.weights.end()) return absl::NotFoundError(p.fqn());
      return it->second;
    };
    // A loaded stage computes up to max_batch_rows rows of a request's
    // queued microbatches at once, where the model follows the batch.
    CalibrationOptions calibration;
    ASSIGN_OR_RETURN(int max_batch_rows, flags.GetInt("max_batch_rows"));
    if (max_batch_rows > 0 && FollowsTheBatch(plan)) calibration.joined_rows = max_batch_rows;
    ASSIGN_OR_RETURN(Calibration c, Calibrate(model.graph, read, *cpu, calibration));
    opts.node_seconds = c.node_seconds;
    opts.cost_rows = c.rows;
    opts.cost_source = c.Describe();
    opts.link_bytes_per_second = (gbps > 0 ? gbps : 1.0) * 1e9;
    ASSIGN_OR_RETURN(plan, Partition(model.graph, opts));
  }
  out << FormatPlan(plan);
  return absl::OkStatus();
}

absl::Status RunLocal(const FlagSet& flags, std::ostream& out, std::ostream&) {
  ASSIGN_OR_RETURN(PartitionOptions opts, PartitionOptionsFrom(flags));
  ASSIGN_OR_RETURN(Model model, ReadModelFile(flags.Get("model")));
  ASSIGN_OR_RETURN(Plan plan, Partition(model.graph, opts));
  std::vector<std::string> names;
  for (const ValueSpec& spec : model.graph.inputs())
    names.push_back(spec.name());
  ASSIGN_OR_RETURN(std::vector<Tensor> inputs,
                   LoadInputs(names, flags.GetAll("input")));
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
    // The last call's outputs are let go first, as a server lets go of
    // what it has sent: the program reuses their buffers.
    outputs.clear();
    auto start = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(outputs, pipe->Run(inputs));
    ms.push_back(std::chrono::duration<double, std::milli>(
                     std::chrono::steady_clock::now() - start)
                     .count());
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
    out << "output " << i << " (" << plan.outputs(i).name()
        << "): " << ShapeToString(outputs[i].shape());
    if (!dir.empty()) {
      std::string path = absl::StrCat(dir, "/out_", i, ".npy");
      RETURN_IF_ERROR(WriteNpy(path, outputs[i]));
      out << " -> " << path;
    }
    out << "\n";
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Remote commands: each runs against a Client of --server.

using RemoteFn = std::function<absl::Status(
    const FlagSet&, Client&, std::ostream& out, std::ostream& err)>;

// Connects to --server, runs `fn`, and says which server could not be
// reached when that is the error.
std::function<absl::Status(const FlagSet&, std::ostream&, std::ostream&)>
Remote(RemoteFn fn) {
  return [fn](const FlagSet& flags, std::ostream& out, std::ostream& err) {
    const std::string server = flags.Get("server");
    ASSIGN_OR_RETURN(ClientOptions options, ClientOptionsFrom(flags));
    ASSIGN_OR_RETURN(std::unique_ptr<Client> client, Client::Connect(server, options));
    absl::Status s = fn(flags, *client, out, err);
    if (s.code() == absl::StatusCode::kUnavailable) {
      return absl::UnavailableError(absl::StrCat(
          "cannot reach a pipeserve server at ", server, ": ", s.message()));
    }
    return s;
  };
}

// `\r[#######.......] 12.0/48.0 MiB 310.2 MiB/s` on stderr, redrawn at most
// every 100 ms and on the last chunk; the destructor ends the line.
class ProgressBar {
 public:
  explicit ProgressBar(std::ostream& err) : err_(err) {}
  ~ProgressBar() {
    if (drawn_) err_ << "\n" << std::flush;
  }

  void Update(uint64_t sent, uint64_t total) {
    auto now = std::chrono::steady_clock::now();
    if (drawn_ && sent < total &&
        now - last_ < std::chrono::milliseconds(100)) {
      return;
    }
    last_ = now;
    drawn_ = true;
    constexpr int kWidth = 30;
    double frac = total == 0 ? 1.0 : static_cast<double>(sent) / total;
    int filled = static_cast<int>(frac * kWidth + 0.5);
    double seconds = std::chrono::duration<double>(now - start_).count();
    double mib = 1048576.0;
    err_ << "\r[" << std::string(filled, '#')
         << std::string(kWidth - filled, '.') << "] "
         << absl::StrFormat("%.1f/%.1f MiB %.1f MiB/s", sent / mib, total / mib,
                            seconds > 0 ? sent / mib / seconds : 0.0)
         << std::flush;
  }

 private:
  std::ostream& err_;
  const std::chrono::steady_clock::time_point start_ =
      std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point last_;
  bool drawn_ = false;
};

absl::StatusOr<std::string> ReadWhole(const std::string& flag, const std::string& path) {
  std::error_code ec;
  std::ifstream in(path, std::ios::binary);
  if (!std::filesystem::is_regular_file(path, ec) || !in) {
    return absl::NotFoundError(absl::StrCat("--", flag, ": cannot read ", path, " (not a file)"));
  }
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// --chat_template's JSON file: {"roles": {"user": "... {content} ..."},
// "prefix": "...", "generation_prompt": "..."}.
absl::Status ChatTemplateFlag(const std::string& path, ChatTemplate* chat) {
  ASSIGN_OR_RETURN(std::string text, ReadWhole("chat_template", path));
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("--chat_template ", path, ": ", why));
  };
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    return bad(e.what());
  }
  if (!j.is_object()) return bad("not a JSON object");
  for (const auto& [key, v] : j.items()) {
    if (key == "roles" && v.is_object()) {
      for (const auto& [role, format] : v.items()) {
        if (!format.is_string()) return bad("each role's format must be a string");
        (*chat->mutable_roles())[role] = format.get<std::string>();
      }
    } else if ((key == "prefix" || key == "generation_prompt") && v.is_string()) {
      (key == "prefix" ? chat->mutable_prefix() : chat->mutable_generation_prompt())
          ->assign(v.get<std::string>());
    } else {
      return bad(absl::StrCat("\"", key, "\" is not roles (an object), prefix or "
                              "generation_prompt (strings)"));
    }
  }
  return absl::OkStatus();
}

// The tokenizer flags of upload into options.tokenizer (none given: none).
absl::Status TokenizerFlags(const FlagSet& flags, UploadOptions* options) {
  TokenizerSpec* t = options->mutable_tokenizer();
  const std::string vocab = flags.Get("gpt2_vocab"), merges = flags.Get("gpt2_merges");
  const std::string sp = flags.Get("sentencepiece");
  if (vocab.empty() != merges.empty()) {
    return absl::InvalidArgumentError("--gpt2_vocab and --gpt2_merges go together");
  }
  if (!vocab.empty() && !sp.empty()) {
    return absl::InvalidArgumentError("give --gpt2_vocab/--gpt2_merges or --sentencepiece, not both");
  }
  if (!vocab.empty()) {
    ASSIGN_OR_RETURN(*t->mutable_gpt2_bpe()->mutable_vocab_json(), ReadWhole("gpt2_vocab", vocab));
    ASSIGN_OR_RETURN(*t->mutable_gpt2_bpe()->mutable_merges(), ReadWhole("gpt2_merges", merges));
  }
  if (!sp.empty()) {
    ASSIGN_OR_RETURN(*t->mutable_sentencepiece_model(), ReadWhole("sentencepiece", sp));
  }
  if (const std::string chat = flags.Get("chat_template"); !chat.empty()) {
    RETURN_IF_ERROR(ChatTemplateFlag(chat, t->mutable_chat_template()));
  }
  for (const std::string& s : flags.GetAll("stop_token")) {
    int64_t id = 0;
    if (!absl::SimpleAtoi(s, &id)) {
      return absl::InvalidArgumentError(absl::StrCat("--stop_token \"", s, "\" is not a token id"));
    }
    t->add_stop_token_ids(id);
  }
  if (t->kind_case() == TokenizerSpec::KIND_NOT_SET && t->ByteSizeLong() > 0) {
    return absl::InvalidArgumentError(
        "--chat_template and --stop_token need a tokenizer (--gpt2_vocab/--gpt2_merges or "
        "--sentencepiece)");
  }
  return absl::OkStatus();
}

// upload's tokenizer flags (TokenizerFlags reads them).
void AddTokenizerFlags(FlagSet& f) {
  f.Add("gpt2_vocab", "FILE",
        "with --gpt2_merges, GPT-2 BPE files (vocab.json, merges.txt) for "
        "the text APIs of a model exported for generation");
  f.Add("gpt2_merges", "FILE", "see --gpt2_vocab");
  f.Add("sentencepiece", "FILE",
        "a SentencePiece model (tokenizer.model) for the text APIs");
  f.Add("chat_template", "FILE",
        "JSON {\"roles\": {\"user\": \"[INST] {content} [/INST]\", ...}, "
        "\"prefix\": ..., \"generation_prompt\": ...} for /v1/chat/completions");
  f.Add("stop_token", "ID",
        "a token that ends text besides the tokenizer's end of text (repeatable)",
        false, "", /*repeated=*/true);
}

// upload's flags.
void AddUploadFlags(FlagSet& f) {
  AddServerFlag(f);
  f.Add("name", "NAME", "the name to serve the model under", true);
  AddPartitionFlags(f);
  f.Add("microbatches", "M",
        "microbatches per request (0: the server's default)", false,
        "0");
  f.Add("replicas", "R",
        "replicas of every stage, R x stages servers (0: the "
        "server's default)",
        false, "0");
  f.Add("max_batch_rows", "N",
        "dynamic batching: merge concurrent smaller requests into "
        "requests of up to N rows while the model is busy, and let "
        "stages compute a request's queued microbatches together up "
        "to N rows (0: the server's default; -1: never)",
        false, "0");
  f.Add("max_queue_delay_us", "US",
        "dynamic batching: how long a request waits for others (0: "
        "the server's default)",
        false, "0");
  AddBalanceFlags(f, "",
                  "how --num_stages cuts are balanced: measured (node "
                  "times measured on the server) or estimated (FLOPs + "
                  "parameter bytes); default: measured where the "
                  "server can",
                  "the server's default");
  AddTokenizerFlags(f);
}

absl::Status Upload(const FlagSet& flags, Client& client, std::ostream& out,
                    std::ostream& err) {
  UploadOptions options;
  ASSIGN_OR_RETURN(int num_stages, flags.GetInt("num_stages"));
  ASSIGN_OR_RETURN(int microbatches, flags.GetInt("microbatches"));
  ASSIGN_OR_RETURN(int replicas, flags.GetInt("replicas"));
  ASSIGN_OR_RETURN(int max_batch_rows, flags.GetInt("max_batch_rows"));
  ASSIGN_OR_RETURN(int max_queue_delay_us, flags.GetInt("max_queue_delay_us"));
  options.set_max_batch_rows(max_batch_rows);
  options.set_max_queue_delay_us(max_queue_delay_us);
  options.set_num_stages(num_stages);
  options.set_microbatches(microbatches);
  options.set_replicas(replicas);
  ASSIGN_OR_RETURN(UploadOptions::Balance balance, BalanceFlag(flags));
  options.set_balance(balance);
  ASSIGN_OR_RETURN(double link_gb_per_s, LinkFlag(flags));
  options.set_link_gb_per_s(link_gb_per_s);
  for (const std::string& s : flags.GetAll("split")) {
    ASSIGN_OR_RETURN(auto split, ParseSplit(s));
    SplitSpecEntry* e = options.add_split_spec();
    e->set_module(split.first);
    e->set_point(split.second);
  }
  RETURN_IF_ERROR(TokenizerFlags(flags, &options));
  absl::StatusOr<UploadResult> result;
  {
    ProgressBar bar(err);
    result = client.Upload(
        flags.Get("name"), flags.Get("model"), options,
        [&bar](uint64_t sent, uint64_t total) { bar.Update(sent, total); });
  }
  RETURN_IF_ERROR(result.status());
  out << "uploaded model \"" << result->name << "\": " << result->bytes
      << " bytes (" << HumanBytes(result->bytes) << "), ";
  if (!result->waiting.empty()) {
    out << "stored; it deploys once stage servers answer (" << result->waiting << ")\n";
    return absl::OkStatus();
  }
  out << result->num_stages << " stage" << (result->num_stages == 1 ? "" : "s") << "\n";
  return absl::OkStatus();
}

absl::Status Models(const FlagSet&, Client& client, std::ostream& out,
                    std::ostream&) {
  ASSIGN_OR_RETURN(std::vector<ModelSummary> models, client.ListModels());
  if (models.empty()) {
    out << "no models\n";
    return absl::OkStatus();
  }
  std::vector<std::vector<std::string>> rows = {
      {"NAME", "STATE", "STAGES", "SIZE", "REASON"}};
  for (const ModelSummary& m : models) {
    rows.push_back({m.name(), m.state(), absl::StrCat(m.num_stages()),
                    HumanBytes(m.bytes()), m.reason()});
  }
  std::vector<size_t> width(rows[0].size(), 0);
  for (const auto& row : rows) {
    for (size_t c = 0; c < row.size(); ++c)
      width[c] = std::max(width[c], row[c].size());
  }
  for (const auto& row : rows) {
    std::string line;
    for (size_t c = 0; c < row.size(); ++c) {
      if (c + 1 == row.size()) {
        absl::StrAppend(&line, row[c]);  // no padding after the last column
      } else {
        absl::StrAppend(&line, absl::StrFormat("%-*s  ", width[c], row[c]));
      }
    }
    out << line.substr(0, line.find_last_not_of(' ') + 1) << "\n";
  }
  return absl::OkStatus();
}

absl::Status PlanRemote(const FlagSet& flags, Client& client, std::ostream& out,
                        std::ostream&) {
  ASSIGN_OR_RETURN(GetPlanResponse r, client.GetPlan(flags.Get("name")));
  out << "model \"" << r.name() << "\" on " << client.address();
  if (!r.state().empty()) out << " (" << r.state() << ")";
  // stage_servers: one per stage for each replica, lane by lane.
  const int n = r.plan().stages_size();
  const int replicas = std::max(1, r.replicas());
  out << "\n"
      << FormatPlan(r.plan(),
                    std::vector<std::string>(
                        r.stage_servers().begin(),
                        r.stage_servers().begin() +
                            std::min(n, r.stage_servers_size())),
                    std::vector<double>(r.measured_compute_us().begin(),
                                        r.measured_compute_us().end()));
  for (int lane = 1; lane < replicas; ++lane) {
    out << "replica " << lane << ":";
    for (int i = lane * n; i < (lane + 1) * n && i < r.stage_servers_size();
         ++i) {
      out << " " << r.stage_servers(i);
    }
    out << "\n";
  }
  if (replicas > 1) {
    out << replicas << " replicas of every stage (" << r.ready_replicas()
        << " serving); microbatches alternate between them\n";
  }
  out << r.microbatches() << " microbatch"
      << (r.microbatches() == 1 ? "" : "es") << " per request\n";
  if (r.max_batch_rows() > 0) {
    out << "dynamic batching: requests merged up to " << r.max_batch_rows()
        << " rows while " << r.max_batches_in_flight()
        << " merged requests run";
    if (r.max_queue_delay_us() > 0) {
      out << ", waiting up to " << r.max_queue_delay_us() << " us for company";
    }
    out << "\n";
  }
  return absl::OkStatus();
}

// `plan` reads a local file (--model) or asks a server (--name, --server).
absl::Status CheckPlanFlags(const FlagSet& flags) {
  bool local = !flags.GetAll("model").empty();
  bool remote =
      !flags.GetAll("name").empty() || !flags.GetAll("server").empty();
  if (local && remote) {
    return absl::InvalidArgumentError(
        "plan: give --model FILE (a local file) or --name NAME [--server "
        "HOST:PORT] (a deployed model), not both");
  }
  if (!local && !remote) {
    return absl::InvalidArgumentError(
        "plan: missing required flag --model (or --name [--server] for a "
        "deployed model; see --help)");
  }
  if (remote && flags.GetAll("name").empty()) {
    return absl::InvalidArgumentError("plan: --server needs --name NAME");
  }
  if (remote &&
      (!flags.GetAll("num_stages").empty() || !flags.GetAll("split").empty())) {
    return absl::InvalidArgumentError(
        "plan: --num_stages and --split apply to a local --model; a deployed "
        "model was cut when it was uploaded");
  }
  return absl::OkStatus();
}

absl::Status Plan_(const FlagSet& flags, std::ostream& out, std::ostream& err) {
  if (!flags.GetAll("model").empty()) return PlanLocal(flags, out);
  return Remote(PlanRemote)(flags, out, err);
}

// The inputs of --input, named by the deployed model's metadata (for
// inputs given by position).
absl::StatusOr<std::vector<NamedTensor>> NamedInputs(const FlagSet& flags, Client& client,
                                                     const std::string& model) {
  ASSIGN_OR_RETURN(inference::ModelMetadataResponse meta, client.ModelMetadata(model));
  std::vector<std::string> names;
  for (const auto& in : meta.inputs()) names.push_back(in.name());
  ASSIGN_OR_RETURN(std::vector<Tensor> tensors, LoadInputs(names, flags.GetAll("input")));
  std::vector<NamedTensor> inputs;
  for (size_t i = 0; i < names.size(); ++i) inputs.push_back({names[i], tensors[i]});
  return inputs;
}

// Prints each output's shape and, with `dir`, writes it there as .npy.
absl::Status WriteOutputs(const std::vector<NamedTensor>& outputs, const std::string& dir,
                          std::ostream& out) {
  if (!dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) {
      return absl::PermissionDeniedError(
          absl::StrCat("cannot create --output_dir \"", dir, "\": ", ec.message()));
    }
  }
  for (size_t i = 0; i < outputs.size(); ++i) {
    out << "output " << i << " (" << outputs[i].name
        << "): " << ShapeToString(outputs[i].tensor.shape());
    if (!dir.empty()) {
      std::string path = absl::StrCat(dir, "/", FileNameFor(outputs[i].name), ".npy");
      RETURN_IF_ERROR(WriteNpy(path, outputs[i].tensor));
      out << " -> " << path;
    }
    out << "\n";
  }
  return absl::OkStatus();
}

// Writes the request's timeline (Chrome trace JSON) to `path`.
absl::Status WriteTrace(const std::string& trace, const std::string& path, std::ostream& out) {
  if (trace.empty()) {
    return absl::UnimplementedError(
        "--trace: the server sent no timeline (it is not pipeserve, or too old)");
  }
  std::ofstream f(path, std::ios::binary);
  f << trace;
  if (!f.good()) {
    return absl::PermissionDeniedError(absl::StrCat("--trace: cannot write \"", path, "\""));
  }
  out << "trace -> " << path << " (open it in ui.perfetto.dev)\n";
  return absl::OkStatus();
}

absl::Status Infer(const FlagSet& flags, Client& client, std::ostream& out, std::ostream&) {
  const std::string model = flags.Get("name");
  ASSIGN_OR_RETURN(int timeout_ms, flags.GetInt("timeout_ms"));
  ASSIGN_OR_RETURN(std::vector<NamedTensor> inputs, NamedInputs(flags, client, model));
  const std::string trace_path = flags.Get("trace");
  std::string trace;
  auto start = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(std::vector<NamedTensor> outputs,
                   client.Infer(model, inputs, absl::Milliseconds(std::max(0, timeout_ms)),
                                trace_path.empty() ? nullptr : &trace));
  double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  RETURN_IF_ERROR(WriteOutputs(outputs, flags.Get("output_dir"), out));
  out << absl::StrFormat("latency %.3f ms\n", ms);
  if (!trace_path.empty()) RETURN_IF_ERROR(WriteTrace(trace, trace_path, out));
  return absl::OkStatus();
}

absl::StatusOr<double> DoubleFlag(const FlagSet& flags, const std::string& name) {
  double v = 0;
  if (!absl::SimpleAtod(flags.Get(name), &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be a number, got \"", flags.Get(name), "\""));
  }
  return v;
}

absl::StatusOr<std::vector<int64_t>> TokenList(const FlagSet& flags, const std::string& name) {
  std::vector<int64_t> ids;
  for (absl::string_view part : absl::StrSplit(flags.Get(name), ',', absl::SkipWhitespace())) {
    int64_t id = 0;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &id)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, ": \"", part, "\" is not a token id"));
    }
    ids.push_back(id);
  }
  return ids;
}

absl::StatusOr<GenerateRequest> GenerateRequestFrom(const FlagSet& flags) {
  GenerateRequest req;
  req.set_model(flags.Get("name"));
  ASSIGN_OR_RETURN(std::vector<int64_t> prompt, TokenList(flags, "prompt"));
  ASSIGN_OR_RETURN(std::vector<int64_t> stops, TokenList(flags, "stop_token_ids"));
  *req.mutable_prompt() = {prompt.begin(), prompt.end()};
  *req.mutable_stop_token_ids() = {stops.begin(), stops.end()};
  ASSIGN_OR_RETURN(int max_tokens, flags.GetInt("max_tokens"));
  ASSIGN_OR_RETURN(int top_k, flags.GetInt("top_k"));
  ASSIGN_OR_RETURN(double temperature, DoubleFlag(flags, "temperature"));
  ASSIGN_OR_RETURN(double top_p, DoubleFlag(flags, "top_p"));
  req.set_max_tokens(max_tokens);
  req.set_top_k(top_k);
  req.set_temperature(temperature);
  req.set_top_p(top_p);
  if (!flags.Get("seed").empty()) {
    uint64_t seed = 0;
    if (!absl::SimpleAtoi(flags.Get("seed"), &seed)) {
      return absl::InvalidArgumentError("--seed must be a non-negative integer");
    }
    req.set_seed(seed);
  }
  return req;
}

// Prints each token id as it comes, then time to first token and the rate.
absl::Status Generate(const FlagSet& flags, Client& client, std::ostream& out, std::ostream&) {
  ASSIGN_OR_RETURN(GenerateRequest req, GenerateRequestFrom(flags));
  ASSIGN_OR_RETURN(int timeout_ms, flags.GetInt("timeout_ms"));
  const auto start = std::chrono::steady_clock::now();
  double first_ms = 0;
  int64_t n = 0;
  std::string finish;
  auto ms_since = [&start] {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
        .count();
  };
  RETURN_IF_ERROR(client.Generate(
      req,
      [&](const GenerateResponse& r) {
        if (n++ == 0) first_ms = ms_since();
        out << (n > 1 ? " " : "") << r.token_id() << std::flush;
        finish = r.finish_reason();
        return true;
      },
      absl::Milliseconds(std::max(0, timeout_ms))));
  const double total_ms = ms_since();
  out << "\n"
      << absl::StrFormat("%d tokens (%s), time to first token %.1f ms, %.1f tokens/s after it\n",
                         n, finish, first_ms,
                         n > 1 ? (n - 1) * 1000.0 / (total_ms - first_ms) : 0.0);
  return absl::OkStatus();
}

absl::Status Health(const FlagSet&, Client& client, std::ostream& out,
                    std::ostream&) {
  // grpc.health.v1 decides: it answers without a token, on coordinators and
  // stage servers alike. KServe's live/ready are shown when the server
  // offers them (stage servers do not).
  absl::StatusOr<std::string> health = client.Health();
  auto shown = [](const absl::StatusOr<bool>& b) {
    return b.ok() ? std::string(*b ? "true" : "false") : std::string("n/a");
  };
  absl::StatusOr<bool> live = client.ServerLive();
  absl::StatusOr<bool> ready = client.ServerReady();
  bool healthy;
  std::string health_text;
  if (health.ok()) {
    healthy = *health == "SERVING";
    health_text = *health;
  } else if (health.status().code() == absl::StatusCode::kUnimplemented) {
    // No grpc.health.v1 service: KServe's answers decide.
    if (!live.ok()) return live.status();
    if (!ready.ok()) return ready.status();
    healthy = *live && *ready;
    health_text = "not offered by the server";
  } else {
    return health.status();
  }
  out << "server  " << client.address() << "\n"
      << "live    " << shown(live) << "\n"
      << "ready   " << shown(ready) << "\n"
      << "health  " << health_text << "\n";
  if (!healthy) {
    return absl::FailedPreconditionError(
        absl::StrCat("server at ", client.address(), " is not serving"));
  }
  return absl::OkStatus();
}

absl::Status Unload(const FlagSet& flags, Client& client, std::ostream& out, std::ostream&) {
  const std::string name = flags.Get("name");
  RETURN_IF_ERROR(client.Unload(name));
  out << "unloaded \"" << name << "\"\n";
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// The command table.

struct Command {
  std::string summary;
  std::function<void(FlagSet&)> flags;
  std::function<absl::Status(const FlagSet&, std::ostream& out,
                             std::ostream& err)>
      run;
  // Checks flag combinations after parsing; an error is a usage error.
  std::function<absl::Status(const FlagSet&)> check = nullptr;
};

void AddPlanFlags(FlagSet& f) {
  AddPartitionFlags(f, /*model_required=*/false);
  AddBalanceFlags(f, "estimated",
                  "with --model and --num_stages: estimated (FLOPs + "
                  "parameter bytes) or measured (every node timed on "
                  "this machine's CPU, as a coordinator does at upload)",
                  "1 GB/s");
  f.Add("max_batch_rows", "N",
        "with --balance measured: the rows a loaded stage computes at once "
        "(its queued microbatches of a request joined), as a server's "
        "max_batch_rows; -1: one microbatch at a time",
        false, "64");
  f.Add("name", "NAME", "a model deployed on --server");
  AddServerFlag(f);
}

void AddRunLocalFlags(FlagSet& f) {
  AddPartitionFlags(f);
  f.Add("input", "[NAME=]FILE.npy",
        "a model input (.npy of the input's dtype), by name or in input order", true,
        "", true);
  f.Add("chunks", "N", "microbatches per call", false, "1");
  f.Add("threads", "T", "GEMM threads", false, "1");
  f.Add("repeat", "N", "run N times and report the median time", false,
        "1");
  f.Add("output_dir", "DIR", "write outputs there as out_<i>.npy");
}

void AddInferFlags(FlagSet& f) {
  AddServerFlag(f);
  f.Add("name", "NAME", "the deployed model", true);
  f.Add("input", "[NAME=]FILE.npy",
        "a model input (.npy of the input's dtype), by name or in input order", true,
        "", true);
  f.Add("output_dir", "DIR",
        "write outputs there as <output name>.npy");
  f.Add("timeout_ms", "N", "deadline of the request (0: 60 s)", false,
        "0");
  f.Add("trace", "FILE",
        "ask for the request's timeline (every microbatch on every "
        "stage) and write it there as Chrome trace JSON, for "
        "ui.perfetto.dev");
}

void AddGenerateFlags(FlagSet& f) {
  AddServerFlag(f);
  f.Add("name", "NAME", "the deployed model", true);
  f.Add("prompt", "ID,ID,...", "the prompt's token ids", true);
  f.Add("max_tokens", "N", "tokens to generate at most", false, "16");
  f.Add("temperature", "T", "0: greedy", false, "0");
  f.Add("top_k", "K", "sample among the K most likely (0: all)", false, "0");
  f.Add("top_p", "P", "sample among the fewest tokens holding P", false, "1");
  f.Add("stop_token_ids", "ID,ID,...", "tokens that end the generation");
  f.Add("seed", "N", "makes sampling reproducible (default: random)");
  f.Add("timeout_ms", "N", "deadline of the request (0: 60 s)", false, "0");
}

void AddUnloadFlags(FlagSet& f) {
  AddServerFlag(f);
  f.Add("name", "NAME", "the model to unload", true);
}

std::map<std::string, Command> Commands() {
  return {
      {"plan",
       {"Print how a model is cut into stages: parameters, and the values\n"
        "crossing each boundary. With --model, of a local file; with --name,\n"
        "of a model deployed on --server (with its stage servers).",
        AddPlanFlags,
        Plan_, CheckPlanFlags}},
      {"run-local",
       {"Cut a model into stages and run them in this process (the\n"
        "equivalent of torch.distributed.pipelining's pipe(x, y)).",
        AddRunLocalFlags,
        RunLocal}},
      {"upload",
       {"Upload a model file to the coordinator, which cuts it into stages\n"
        "and deploys them on its stage servers.",
        AddUploadFlags,
        Remote(Upload)}},
      {"models",
       {"List the models on the server with their state, stages and size.",
        AddServerFlag, Remote(Models)}},
      {"infer",
       {"Run a deployed model on .npy inputs over the KServe v2 API.",
        AddInferFlags,
        Remote(Infer)}},
      {"generate",
       {"Generate tokens from a model exported with generation=True, printing\n"
        "each token id as it comes, then time to first token and tokens/s.",
        AddGenerateFlags,
        Remote(Generate)}},
      {"health",
       {"Check that the server is serving (grpc.health.v1; exit 1 if not).",
        AddServerFlag, Remote(Health)}},
      {"unload",
       {"Stop serving a model, unload its stages and remove it from the\n"
        "server's repository.",
        AddUnloadFlags,
        Remote(Unload)}},
  };
}

void Usage(std::ostream& os) {
  os << "usage: pipeserve COMMAND [flags]   (pipeserve COMMAND "
        "--help)\n\ncommands:\n";
  for (const auto& [name, cmd] : Commands()) {
    // The summary's first sentence, on one line.
    size_t end = std::min(cmd.summary.find(". "), cmd.summary.find(".\n"));
    std::string first =
        cmd.summary.substr(0, end == std::string::npos ? end : end + 1);
    std::replace(first.begin(), first.end(), '\n', ' ');
    os << "  " << absl::StrFormat("%-10s", name) << first << "\n";
  }
}

}  // namespace

int RunCli(const std::vector<std::string>& args, std::ostream& out,
           std::ostream& err) {
  if (args.empty() || args[0] == "--help" || args[0] == "-h" ||
      args[0] == "help") {
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
  const Command& cmd = it->second;
  FlagSet flags(it->first, cmd.summary);
  cmd.flags(flags);
  absl::Status parsed =
      flags.Parse(std::vector<std::string>(args.begin() + 1, args.end()));
  if (flags.help_requested()) {
    out << flags.Help();
    return 0;
  }
  if (parsed.ok() && cmd.check) parsed = cmd.check(flags);
  if (!parsed.ok()) {
    err << "pipeserve " << parsed.message() << "\n";
    return 2;
  }
  absl::Status s = cmd.run(flags, out, err);
  if (!s.ok()) {
    err << "pipeserve " << it->first << ": " << s.message() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace pipeserve
