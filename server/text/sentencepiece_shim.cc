// libpipeserve_sentencepiece.so: libsentencepiece behind SentencePieceModel
// (see sentencepiece_model.h for why it is a library of its own). Only the
// standard library and libsentencepiece here.
#include <sentencepiece_processor.h>

#include "server/text/sentencepiece_model.h"

namespace pipeserve {
namespace {

class Model : public SentencePieceModel {
 public:
  bool Encode(const std::string& text, std::vector<int>* ids, std::string* error) const override {
    const sentencepiece::util::Status s = sp_.Encode(text, ids);
    if (!s.ok()) *error = s.ToString();
    return s.ok();
  }
  int size() const override { return sp_.GetPieceSize(); }
  std::string Piece(int id) const override { return sp_.IdToPiece(id); }
  bool IsControl(int id) const override { return sp_.IsControl(id); }
  bool IsByte(int id) const override { return sp_.IsByte(id); }
  bool IsUnknown(int id) const override { return sp_.IsUnknown(id); }
  int bos_id() const override { return sp_.bos_id(); }
  int eos_id() const override { return sp_.eos_id(); }

  sentencepiece::SentencePieceProcessor sp_;
};

}  // namespace
}  // namespace pipeserve

// What sentencepiece_model.cc looks up: a new model, or null with `error` set.
extern "C" __attribute__((visibility("default"))) pipeserve::SentencePieceModel*
PipeserveLoadSentencePiece(const std::string& bytes, std::string* error) {
  auto m = new pipeserve::Model();
  const sentencepiece::util::Status s = m->sp_.LoadFromSerializedProto(bytes);
  if (!s.ok()) {
    *error = s.ToString();
    delete m;
    return nullptr;
  }
  return m;
}
