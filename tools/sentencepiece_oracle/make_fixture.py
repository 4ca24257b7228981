#!/usr/bin/python3
"""Writes server/text/testdata/sentencepiece.model, a small SentencePiece
model trained here by Debian's python3-sentencepiece (unigram, 320 pieces,
byte fallback), and sentencepiece_oracle.jsonl: texts with the ids
SentencePiece encodes them to and the text it decodes those ids back to,
which //server/text:tokenizer_test checks the C++ side against.

  /usr/bin/python3 tools/sentencepiece_oracle/make_fixture.py
"""
import io
import json
import os
import random

import sentencepiece as spm

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "server", "text", "testdata")

WORDS = ("the quick brown fox jumps over lazy dog pipeline stage server model token "
         "cache sequence prompt answer hello world generation tensor layer attention "
         "über café naïve résumé 東京 日本語 Ελληνικά").split()


def corpus(rng):
    for _ in range(3000):
        yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".!?,")


def texts(rng):
    fixed = ["Hello world", "  leading and  double spaces", "tabs\tand\nnewlines\n",
             "unseen letters: ζ ж ש 🚀 ∑", "", "the cache", "a</s>b", "<s>start",
             "emoji 🚀🚀 and CJK 漢字", "digits 1234567890", "x" * 50]
    for t in fixed:
        yield t
    alphabet = WORDS + ["🚀", "ж", "\n", "  ", "42", "é", "<s>", "</s>"]
    for _ in range(120):
        yield " ".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))


def main():
    rng = random.Random(7)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=corpus(rng), model_writer=model, vocab_size=320,
        model_type="unigram", byte_fallback=True, character_coverage=0.9995,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    with open(os.path.join(OUT, "sentencepiece.model"), "wb") as f:
        f.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(os.path.join(OUT, "sentencepiece_oracle.jsonl"), "w") as f:
        for t in texts(rng):
            ids = sp.encode(t)
            f.write(json.dumps({"text": t, "ids": ids, "decoded": sp.decode(ids)},
                               ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
