#include "client/cli_flags.h"

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace pipeserve {

FlagSet::FlagSet(std::string command, std::string summary)
    : command_(std::move(command)), summary_(std::move(summary)) {}

void FlagSet::Add(const std::string& name, const std::string& value_name,
                  const std::string& help, bool required,
                  const std::string& default_value, bool repeated) {
  order_.push_back(name);
  flags_[name] = Flag{value_name, help, default_value, required, repeated, {}};
}

absl::Status FlagSet::Parse(const std::vector<std::string>& args) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      help_ = true;
      return absl::OkStatus();
    }
    if (!absl::StartsWith(a, "--")) {
      return absl::InvalidArgumentError(absl::StrCat(
          command_, ": unexpected argument \"", a, "\" (see --help)"));
    }
    std::string name = a.substr(2), value;
    size_t eq = name.find('=');
    bool has_value = eq != std::string::npos;
    if (has_value) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    auto it = flags_.find(name);
    if (it == flags_.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          command_, ": unknown flag --", name, " (see --help)"));
    }
    if (!has_value) {
      if (i + 1 >= args.size()) {
        return absl::InvalidArgumentError(
            absl::StrCat(command_, ": flag --", name, " needs a value"));
      }
      value = args[++i];
    }
    Flag& f = it->second;
    if (!f.repeated) f.values.clear();
    f.values.push_back(value);
  }
  for (const std::string& name : order_) {
    const Flag& f = flags_.at(name);
    if (f.required && f.values.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          command_, ": missing required flag --", name, " (see --help)"));
    }
  }
  return absl::OkStatus();
}

std::string FlagSet::Help() const {
  std::string text =
      absl::StrCat("usage: pipeserve ", command_, " [flags]\n\n", summary_, "\n\nflags:\n");
  for (const std::string& name : order_) {
    const Flag& f = flags_.at(name);
    std::string left = absl::StrCat("  --", name, " ", f.value_name);
    std::string right = f.help;
    if (f.required) absl::StrAppend(&right, " (required)");
    if (!f.default_value.empty()) absl::StrAppend(&right, " (default ", f.default_value, ")");
    if (f.repeated) absl::StrAppend(&right, " (repeatable)");
    absl::StrAppend(&text, absl::StrFormat("%-28s %s\n", left, right));
  }
  return text;
}

std::string FlagSet::Get(const std::string& name) const {
  const Flag& f = flags_.at(name);
  return f.values.empty() ? f.default_value : f.values.back();
}

std::vector<std::string> FlagSet::GetAll(const std::string& name) const {
  return flags_.at(name).values;
}

absl::StatusOr<int> FlagSet::GetInt(const std::string& name) const {
  int v;
  std::string s = Get(name);
  if (!absl::SimpleAtoi(s, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat(command_, ": --", name, " must be an integer, got \"", s, "\""));
  }
  return v;
}

}  // namespace pipeserve
