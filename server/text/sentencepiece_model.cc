#include "server/text/sentencepiece_model.h"

#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <mutex>

namespace pipeserve {
namespace {

constexpr char kLibrary[] = "libpipeserve_sentencepiece.so";
using LoadFn = SentencePieceModel* (*)(const std::string&, std::string*);

bool Sanitized() {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  return true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
  return true;
#endif
#endif
  return false;
}

std::vector<std::string> Candidates() {
  std::vector<std::string> out;
  if (const char* env = std::getenv("PIPESERVE_SENTENCEPIECE_LIB")) out.push_back(env);
  const std::string rel = std::string("/pipeserve/server/text/") + kLibrary;
  for (const char* var : {"RUNFILES_DIR", "TEST_SRCDIR"}) {
    if (const char* dir = std::getenv(var)) out.push_back(dir + rel);
  }
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n > 0) {
    const std::string path(exe, n);
    out.push_back(path + ".runfiles" + rel);
    out.push_back(path.substr(0, path.rfind('/') + 1) + kLibrary);
  }
  return out;
}

// The library's load function, found once; null with `error` set.
LoadFn FindLoad(std::string* error) {
  static std::once_flag once;
  static LoadFn load = nullptr;
  static std::string why;
  std::call_once(once, [] {
    if (Sanitized()) {
      why = "this build is sanitized, and sanitizers refuse RTLD_DEEPBIND, which "
            "libsentencepiece needs here";
      return;
    }
    std::string tried;
    for (const std::string& path : Candidates()) {
      if (!tried.empty()) tried += "; ";
      void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
      if (lib == nullptr) {
        const char* e = dlerror();
        tried += path + ": " + (e != nullptr ? e : "not loaded");
        continue;
      }
      load = reinterpret_cast<LoadFn>(dlsym(lib, "PipeserveLoadSentencePiece"));
      if (load != nullptr) return;
      tried += path + ": no PipeserveLoadSentencePiece in it";
    }
    why = std::string(kLibrary) + " could not be loaded (" + tried +
          "; set PIPESERVE_SENTENCEPIECE_LIB to its path)";
  });
  if (load == nullptr) *error = why;
  return load;
}

}  // namespace

std::unique_ptr<SentencePieceModel> SentencePieceModel::Load(const std::string& bytes,
                                                             std::string* error) {
  LoadFn load = FindLoad(error);
  if (load == nullptr) return nullptr;
  return std::unique_ptr<SentencePieceModel>(load(bytes, error));
}

}  // namespace pipeserve
