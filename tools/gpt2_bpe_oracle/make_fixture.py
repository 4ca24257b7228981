"""Writes server/text/testdata/gpt2_bpe_oracle.jsonl: texts that reach
every branch of GPT-2's pre-tokenizer (contractions, letters, numbers,
other symbols, whitespace runs before a word and at the end, characters of
many scripts, combining marks, emoji sequences) with the ids npm
gpt-3-encoder gives them (oracle.js), for //server/text:gpt2_bpe_test.

  (cd tools/gpt2_bpe_oracle && npm ci && python3 make_fixture.py)
"""
import json
import os
import random
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "..", "server", "text", "testdata", "gpt2_bpe_oracle.jsonl")

FIXED = [
    "Hello world", "Hello, world! It's 2026.", "  leading spaces and trailing  ",
    "naïve café — 東京 🚀", "don't I'll we've they're", "a\n\nb\tc", "12345 3.14159", "",
    "IT'S THEY'RE", "it’s curly", "''s", "'sa", "x'", "' ", " '", "'re've'll'd'm't",
    "tabs\t\tand\n\n\nnewlines\r\n", "   ", "\n", " x", "x ", "x  ", "x  y", "x \t y",
    "no\u00a0break\u3000ideographic\u2028line\u205fmath", "\u0085next\u001cfile",
    "e\u0301 combining é", "Ⅻ ² ½ ① ٣٤٥ ３ 〇", "snake_case and kebab-case",
    "emoji 👨\u200d👩\u200d👧 flags 🇩🇪 skin 👍🏽", "Ελληνικά Русский עברית العربية हिन्दी",
    "$$$ ((( ))) ... !!! ???", "a1b2c3 1st 2nd 3rd", "C++ int main() { return 0; }",
    "https://example.com/path?q=1&r=2#frag", "<|endoftext|>",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "日本語のテキストと漢字、ひらがな、カタカナ。", "mid\ufeffbom", "\u200bzero width",
]

ALPHABET = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") * 4 +
            list(" " * 30) + list("\t\n\r'’\".,;:!?-_()[]{}<>/\\@#$%^&*+=~`|") +
            list("éüßøåçñ東京語日本한국어ع٣Ⅻ²½①🚀😀👍\u0301\u00a0\u3000"))


def random_texts(n, seed=2026):
    rng = random.Random(seed)
    for _ in range(n):
        yield "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 60)))


def main():
    texts = FIXED + list(random_texts(400))
    lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    out = subprocess.run(["node", os.path.join(HERE, "oracle.js")], input=lines.encode(),
                         stdout=subprocess.PIPE, check=True).stdout
    with open(OUT, "wb") as f:
        f.write(out)
    print(f"wrote {len(texts)} texts to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
