#include "server/coordinator/model_store.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

// Every fsync() of this program, as the paths synced in order: this
// definition takes the place of libc's for the whole executable, the
// store's calls included.
absl::Mutex synced_mu;
std::vector<std::string>& Synced() {
  static auto* paths = new std::vector<std::string>;
  return *paths;
}
extern "C" int fsync(int fd) {
  char path[4096];
  const std::string link = "/proc/self/fd/" + std::to_string(fd);
  const ssize_t n = ::readlink(link.c_str(), path, sizeof path);
  {
    absl::MutexLock lock(&synced_mu);
    Synced().push_back(n > 0 ? std::string(path, n) : "?");
  }
  return static_cast<int>(::syscall(SYS_fsync, fd));
}

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

std::string FreshRoot(const std::string& name) {
  std::string root = std::string(std::getenv("TEST_TMPDIR")) + "/" + name;
  std::filesystem::remove_all(root);
  return root;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

TEST(ModelStoreTest, CommittedUploadIsListedWithItsOptions) {
  auto store = OpenFileModelStore(FreshRoot("a"));
  ASSERT_TRUE(store.ok()) << store.status();
  auto up = (*store)->StartUpload("example");
  ASSERT_TRUE(up.ok());
  ASSERT_TRUE((*up)->Append("hello ").ok());
  ASSERT_TRUE((*up)->Append("world").ok());
  EXPECT_EQ((*up)->bytes(), 11u);
  UploadOptions opts;
  opts.set_microbatches(8);
  ASSERT_TRUE((*up)->Commit(opts).ok());
  auto list = (*store)->List();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].name, "example");
  EXPECT_EQ((*list)[0].options.microbatches(), 8);
  EXPECT_EQ(ReadAll((*list)[0].path), "hello world");
}

TEST(ModelStoreTest, AbandonedUploadIsNeverVisible) {
  std::string root = FreshRoot("b");
  auto store = OpenFileModelStore(root);
  {
    auto up = (*store)->StartUpload("half");
    ASSERT_TRUE((*up)->Append("partial").ok());
    EXPECT_TRUE((*(*store)->List()).empty());
  }  // destroyed without Commit
  EXPECT_TRUE((*(*store)->List()).empty());
  EXPECT_TRUE(std::filesystem::is_empty(root + "/.staging"));
}

TEST(ModelStoreTest, ReplacingKeepsOneVersionAndSurvivesReopen) {
  std::string root = FreshRoot("c");
  {
    auto store = OpenFileModelStore(root);
    for (const char* body : {"v1", "v2"}) {
      auto up = (*store)->StartUpload("m");
      ASSERT_TRUE((*up)->Append(body).ok());
      ASSERT_TRUE((*up)->Commit({}).ok());
    }
  }
  auto reopened = OpenFileModelStore(root);
  auto list = (*reopened)->List();
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ(ReadAll((*list)[0].path), "v2");
  EXPECT_EQ((*list)[0].version, 2) << "each upload of a name is its next version";
  int versions = 0;
  for (auto& e : std::filesystem::directory_iterator(root + "/.versions")) {
    (void)e;
    ++versions;
  }
  EXPECT_EQ(versions, 1);
}

TEST(ModelStoreTest, VersionsCountUploadsOfANameAndStartAgainAfterRemoval) {
  auto store = OpenFileModelStore(FreshRoot("v"));
  for (int64_t want : {1, 2, 3}) {
    auto up = (*store)->StartUpload("m");
    ASSERT_TRUE((*up)->Commit({}).ok());
    EXPECT_EQ((*up)->version(), want);
  }
  auto other = (*store)->StartUpload("other");
  ASSERT_TRUE((*other)->Commit({}).ok());
  EXPECT_EQ((*other)->version(), 1);
  ASSERT_TRUE((*store)->Remove("m").ok());
  auto again = (*store)->StartUpload("m");
  ASSERT_TRUE((*again)->Commit({}).ok());
  EXPECT_EQ((*again)->version(), 1);
}

TEST(ModelStoreTest, BadNamesAreRejectedWithTheRule) {
  auto store = OpenFileModelStore(FreshRoot("d"));
  for (const char* bad : {"", ".hidden", "a/b", "../x", "sp ace"}) {
    auto up = (*store)->StartUpload(bad);
    ASSERT_FALSE(up.ok()) << bad;
    EXPECT_EQ(up.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(up.status().message()), HasSubstr("bad model name"));
  }
}

TEST(ModelStoreTest, RemovedModelIsGoneAndStaysGoneAfterReopen) {
  std::string root = FreshRoot("e");
  {
    auto store = OpenFileModelStore(root);
    auto up = (*store)->StartUpload("gone");
    ASSERT_TRUE((*up)->Append("bytes").ok());
    ASSERT_TRUE((*up)->Commit(UploadOptions()).ok());
    ASSERT_TRUE((*store)->Remove("gone").ok());
    EXPECT_TRUE((*store)->List()->empty());
    EXPECT_EQ((*store)->Remove("gone").code(), absl::StatusCode::kNotFound);
    EXPECT_EQ((*store)->Remove("../etc").code(), absl::StatusCode::kInvalidArgument);
  }
  auto again = OpenFileModelStore(root);
  EXPECT_TRUE((*again)->List()->empty());
  EXPECT_TRUE(std::filesystem::is_empty(root + "/.versions"));
}

// Regression: a commit renamed its staged folder into .versions, published
// the name and deleted the version it replaced without syncing the folders
// the rename changed, so a crash could leave the name pointing at a folder
// whose entry never reached the disk, with the old version gone too.
TEST(ModelStoreTest, ACommitSyncsEveryFolderItChangesBeforeDeletingTheOldVersion) {
  const std::string root = std::filesystem::weakly_canonical(FreshRoot("sync")).string();
  auto store = OpenFileModelStore(root);
  ASSERT_TRUE(store.ok());
  for (const char* body : {"v1", "v2"}) {
    {
      absl::MutexLock lock(&synced_mu);
      Synced().clear();
    }
    auto up = (*store)->StartUpload("m");
    ASSERT_TRUE((*up)->Append(body).ok());
    ASSERT_TRUE((*up)->Commit({}).ok());
    std::vector<std::string> synced;
    {
      absl::MutexLock lock(&synced_mu);
      synced = Synced();
    }
    auto at = [&](const std::string& path) {
      return std::find(synced.begin(), synced.end(), path) - synced.begin();
    };
    const auto n = static_cast<long>(synced.size());
    const std::string version = std::filesystem::read_symlink(root + "/m").filename().string();
    EXPECT_LT(at(root + "/.versions/" + version), n) << "the version folder's own entries";
    EXPECT_LT(at(root + "/.versions"), n) << "the folder the version was renamed into";
    EXPECT_LT(at(root + "/.staging"), n) << "the folder it was renamed out of";
    ASSERT_LT(at(root), n);
    EXPECT_LT(at(root + "/.versions"), at(root)) << "synced before the name is published";
  }
}

}  // namespace
}  // namespace pipeserve
