#include "server/coordinator/model_store.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include "absl/strings/str_cat.h"
#include "common/model_name.h"

namespace pipeserve {
namespace fs = std::filesystem;

namespace {

absl::Status Errno(const std::string& what) {
  return absl::UnavailableError(absl::StrCat(what, ": ", std::strerror(errno)));
}

absl::Status SyncPath(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return Errno("open " + path);
  int rc = ::fsync(fd);
  ::close(fd);
  return rc == 0 ? absl::OkStatus() : Errno("fsync " + path);
}

// The version number stored in `dir`/version; `missing` when there is
// none (a store written before versions were, counts as version 1).
int64_t ReadVersion(const std::string& dir, int64_t missing) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) return missing;
  std::ifstream in(dir + "/version");
  int64_t v = 0;
  return (in >> v && v > 0) ? v : 1;
}

class FilePendingUpload : public PendingUpload {
 public:
  FilePendingUpload(std::string root, std::string name, std::string dir)
      : root_(std::move(root)), name_(std::move(name)), dir_(std::move(dir)),
        path_(dir_ + "/model.psm"), out_(path_, std::ios::binary | std::ios::trunc),
        crc_(::crc32(0L, Z_NULL, 0)) {}

  ~FilePendingUpload() override {
    if (!committed_) {
      std::error_code ec;
      fs::remove_all(dir_, ec);
    }
  }

  absl::Status Append(absl::string_view data) override {
    if (!out_) return absl::UnavailableError("cannot write the staged upload");
    out_.write(data.data(), data.size());
    if (!out_) return absl::UnavailableError("short write to the staged upload (disk full?)");
    bytes_ += data.size();
    crc_ = ::crc32(crc_, reinterpret_cast<const Bytef*>(data.data()), data.size());
    return absl::OkStatus();
  }
  uint64_t bytes() const override { return bytes_; }
  uint32_t crc32() const override { return static_cast<uint32_t>(crc_); }
  int64_t version() const override { return version_; }
  const std::string& path() const override {
    const_cast<std::ofstream&>(out_).flush();
    return path_;
  }

  absl::Status Commit(const UploadOptions& options) override {
    out_.close();
    if (!out_) return absl::UnavailableError("cannot finish the staged upload");
    {
      std::ofstream opts(dir_ + "/options.pb", std::ios::binary | std::ios::trunc);
      if (!options.SerializeToOstream(&opts)) {
        return absl::UnavailableError("cannot write options.pb");
      }
    }
    // One more than the version this replaces (uploads of one name are
    // serialised by the coordinator).
    version_ = ReadVersion(root_ + "/" + name_, /*missing=*/0) + 1;
    {
      std::ofstream v(dir_ + "/version", std::ios::trunc);
      if (!(v << version_ << "\n")) return absl::UnavailableError("cannot write version");
    }
    absl::Status s = SyncPath(path_);
    if (s.ok()) s = SyncPath(dir_ + "/options.pb");
    if (s.ok()) s = SyncPath(dir_ + "/version");
    if (!s.ok()) return s;
    // Move the staged folder to its version name, then swap the symlink.
    static std::atomic<uint64_t> counter{0};
    std::string version = absl::StrCat(".versions/", name_, ".", ::getpid(), ".",
                                       std::chrono::steady_clock::now().time_since_epoch().count(),
                                       ".", counter++);
    std::string link_tmp = absl::StrCat(root_, "/.staging/", name_, ".link.", counter++);
    if (::rename(dir_.c_str(), (root_ + "/" + version).c_str()) != 0) {
      return Errno("rename staged upload");
    }
    committed_ = true;
    // The version folder's entries, and the rename's both ends, reach the
    // disk before the name points there.
    s = SyncPath(root_ + "/" + version);
    if (s.ok()) s = SyncPath(root_ + "/.versions");
    if (s.ok()) s = SyncPath(root_ + "/.staging");
    if (!s.ok()) return s;
    if (::symlink(version.c_str(), link_tmp.c_str()) != 0) return Errno("symlink");
    std::string link = root_ + "/" + name_;
    std::string old_target;
    std::error_code ec;
    if (fs::is_symlink(link, ec)) old_target = fs::read_symlink(link, ec).string();
    if (::rename(link_tmp.c_str(), link.c_str()) != 0) return Errno("publish " + link);
    // Only once the name's new target is on disk does the old version go
    // (if that cannot be made sure, the next start removes it instead).
    if (SyncPath(root_).ok() && !old_target.empty()) fs::remove_all(root_ + "/" + old_target, ec);
    return absl::OkStatus();
  }

 private:
  const std::string root_, name_, dir_, path_;
  std::ofstream out_;
  uLong crc_;
  uint64_t bytes_ = 0;
  int64_t version_ = 0;
  bool committed_ = false;
};

class FileModelStore : public ModelStore {
 public:
  explicit FileModelStore(std::string root) : root_(std::move(root)) {}

  absl::Status Init() {
    std::error_code ec;
    fs::create_directories(root_ + "/.versions", ec);
    fs::create_directories(root_ + "/.staging", ec);
    if (ec) return absl::UnavailableError(absl::StrCat("cannot create ", root_, ": ", ec.message()));
    // Uploads that never finished, and versions no name points to.
    for (const auto& e : fs::directory_iterator(root_ + "/.staging", ec)) fs::remove_all(e.path(), ec);
    std::set<std::string> live;
    for (const auto& e : fs::directory_iterator(root_, ec)) {
      if (fs::is_symlink(e.symlink_status())) {
        live.insert(fs::path(fs::read_symlink(e.path(), ec)).filename().string());
      }
    }
    for (const auto& e : fs::directory_iterator(root_ + "/.versions", ec)) {
      if (!live.count(e.path().filename().string())) fs::remove_all(e.path(), ec);
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::unique_ptr<PendingUpload>> StartUpload(const std::string& name) override {
    absl::Status valid = ValidModelName(name);
    if (!valid.ok()) return valid;
    static std::atomic<uint64_t> counter{0};
    std::string dir = absl::StrCat(root_, "/.staging/", name, ".", ::getpid(), ".", counter++);
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) return absl::UnavailableError(absl::StrCat("cannot stage upload: ", ec.message()));
    return std::unique_ptr<PendingUpload>(new FilePendingUpload(root_, name, dir));
  }

  absl::Status Remove(const std::string& name) override {
    absl::Status valid = ValidModelName(name);
    if (!valid.ok()) return valid;
    std::string link = root_ + "/" + name;
    std::error_code ec;
    if (!fs::is_symlink(link, ec)) {
      return absl::NotFoundError(absl::StrCat("model \"", name, "\" is not stored"));
    }
    std::string target = fs::read_symlink(link, ec).string();
    // Unlinking the name is the atomic step; the version folder goes after.
    if (::unlink(link.c_str()) != 0) return Errno("remove " + link);
    SyncPath(root_).IgnoreError();
    if (!target.empty()) fs::remove_all(root_ + "/" + target, ec);
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<StoredModel>> List() override {
    std::vector<StoredModel> models;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(root_, ec)) {
      if (!fs::is_symlink(e.symlink_status())) continue;
      StoredModel m;
      m.name = e.path().filename().string();
      m.path = (e.path() / "model.psm").string();
      std::ifstream opts((e.path() / "options.pb").string(), std::ios::binary);
      if (!opts || !m.options.ParseFromIstream(&opts)) continue;
      m.version = ReadVersion(e.path().string(), 1);
      m.bytes = fs::file_size(m.path, ec);
      if (ec) continue;
      models.push_back(std::move(m));
    }
    std::sort(models.begin(), models.end(),
              [](const StoredModel& a, const StoredModel& b) { return a.name < b.name; });
    return models;
  }

 private:
  const std::string root_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ModelStore>> OpenFileModelStore(const std::string& root) {
  auto store = std::make_unique<FileModelStore>(fs::absolute(root).string());
  absl::Status s = store->Init();
  if (!s.ok()) return s;
  return std::unique_ptr<ModelStore>(std::move(store));
}

}  // namespace pipeserve
