// A SentencePiece model (Debian's libsentencepiece), behind a header of
// the standard library only. Debian's libsentencepiece carries its own
// copy of protobuf-lite (3.14) and exports its symbols, which clash with
// the system libprotobuf every pipeserve binary links (a crash at start),
// and its header declares an absl::string_view that clashes with Abseil's.
// So it is reached only through libpipeserve_sentencepiece.so
// (sentencepiece_shim.cc), loaded at first use with RTLD_DEEPBIND and
// RTLD_LOCAL: the library binds to its own protobuf, and nothing else
// binds to it. Sanitizer runtimes refuse RTLD_DEEPBIND, so sanitized
// builds have no SentencePiece (Load says so).
//
//   std::string error;
//   std::unique_ptr<SentencePieceModel> m = SentencePieceModel::Load(bytes, &error);
//   std::vector<int> ids;
//   if (!m->Encode("Hello", &ids, &error)) ...
#ifndef PIPESERVE_SERVER_TEXT_SENTENCEPIECE_MODEL_H_
#define PIPESERVE_SERVER_TEXT_SENTENCEPIECE_MODEL_H_

#include <memory>
#include <string>
#include <vector>

namespace pipeserve {

class SentencePieceModel {
 public:
  // From a .model file's bytes; null with `error` set when they do not
  // parse or the library cannot be loaded. The library is looked for in
  // $PIPESERVE_SENTENCEPIECE_LIB, the executable's Bazel runfiles, and
  // beside the executable.
  static std::unique_ptr<SentencePieceModel> Load(const std::string& bytes, std::string* error);
  virtual ~SentencePieceModel() = default;

  // The ids of `text` (no BOS or EOS); false with `error` set on failure.
  virtual bool Encode(const std::string& text, std::vector<int>* ids,
                      std::string* error) const = 0;
  virtual int size() const = 0;
  virtual std::string Piece(int id) const = 0;
  // Kinds of piece: control (<s>, </s>), byte fallback (<0x0A>), unknown.
  virtual bool IsControl(int id) const = 0;
  virtual bool IsByte(int id) const = 0;
  virtual bool IsUnknown(int id) const = 0;
  virtual int bos_id() const = 0;  // -1: none
  virtual int eos_id() const = 0;  // -1: none
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TEXT_SENTENCEPIECE_MODEL_H_
