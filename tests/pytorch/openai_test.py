"""The text APIs against a real coordinator and stage servers: models
uploaded with a tokenizer (GPT-2's real BPE files; a SentencePiece model
trained here with python3-sentencepiece) answer OpenAI's /v1/completions
and /v1/chat/completions, with and without streaming, and Triton's
generate with text_input. Outputs are checked against the gRPC path's
tokens for the same seed, decoded by GPT-2's byte table or by
SentencePiece itself; OpenAI's own Node client (npm `openai`) runs against
the server too. Bad requests get OpenAI's error object."""
import hashlib
import http.client
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import unittest

import sentencepiece as spm
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import models  # noqa: E402
import pipeserve  # noqa: E402
import transformer_models as tm  # noqa: E402
from coordinator_process import Coordinator, _read, sanitized  # noqa: E402

GPT2_FILES = {"gpt2_vocab": os.path.join(ROOT, "third_party/gpt2_bpe/encoder.json"),
              "gpt2_merges": os.path.join(ROOT, "third_party/gpt2_bpe/vocab.bpe")}
EOT = 50256
CHAT = {"roles": {"system": "System: {content} ", "user": "User: {content} ",
                  "assistant": "Assistant: {content}</s>"},
        "generation_prompt": "Assistant:"}


def gpt2_decoder():
    """GPT-2's ids -> bytes, from its vocabulary and byte table."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) +
          list(range(ord("\xae"), ord("\xff") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_of = {chr(c): b for b, c in zip(bs, cs)}
    with open(GPT2_FILES["gpt2_vocab"], encoding="utf-8") as f:
        symbols = {i: s for s, i in json.load(f).items()}
    return lambda ids: bytes(byte_of[ch] for i in ids if i != EOT for ch in symbols[i]).decode(
        "utf-8", errors="replace")


def train_sentencepiece(path):
    rng = random.Random(3)
    words = ("the model serves tokens over a pipeline of stages and every stage holds "
             "its layers cache user assistant system hello world").split()
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
                 for _ in range(2000)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=out,
                                   vocab_size=360, model_type="bpe", byte_fallback=True,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    with open(path, "wb") as f:
        f.write(out.getvalue())
    return spm.SentencePieceProcessor(model_proto=out.getvalue())


class OpenAiTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))
        cls.coord = Coordinator(cls.tmp, "--http_port=0", f"--http_port_file={cls.tmp}/http_port")
        cls.port = int(_read(os.path.join(cls.tmp, "http_port")))
        cls.decode = staticmethod(gpt2_decoder())
        torch.manual_seed(0)
        path = os.path.join(cls.tmp, "gpt2.psm")
        pipeserve.export(tm.Gpt2(vocab=50257, layers=2, max_len=96).eval(),
                         (torch.randint(0, 50257, (1, 5)),), path, generation=True)
        cls.coord.client.upload("gpt2", path, tokenizer=GPT2_FILES)
        # Sanitized builds cannot load libsentencepiece (server/text/sentencepiece_model.h).
        cls.sentencepiece = not sanitized(cls.coord.proc.pid)
        if cls.sentencepiece:
            sp_path = os.path.join(cls.tmp, "sp.model")
            cls.sp = train_sentencepiece(sp_path)
            path = os.path.join(cls.tmp, "llama.psm")
            pipeserve.export(tm.Llama(vocab=cls.sp.get_piece_size(), max_len=96).eval(),
                             (torch.randint(0, 100, (1, 5)),), path, generation=True)
            cls.coord.client.upload("llama", path, tokenizer={"sentencepiece": sp_path,
                                                              "chat_template": CHAT})
        path = os.path.join(cls.tmp, "ids.psm")  # no tokenizer
        pipeserve.export(tm.Gpt2(max_len=32).eval(), (torch.randint(0, 97, (1, 5)),), path,
                         generation=True)
        cls.coord.client.upload("ids", path)

    @classmethod
    def tearDownClass(cls):
        cls.coord.close()

    def post(self, path, body):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request("POST", path, body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, data

    def ok(self, path, body):
        status, data = self.post(path, body)
        self.assertEqual(status, 200, data)
        return json.loads(data)

    def events(self, path, body):
        """The data of each server-sent event, up to and without [DONE]."""
        status, data = self.post(path, body)
        self.assertEqual(status, 200, data)
        lines = [line for line in data.decode().split("\n\n") if line]
        self.assertTrue(all(line.startswith("data: ") for line in lines), lines)
        return [line[len("data: "):] for line in lines]

    def grpc_text(self, prompt_ids, max_tokens, seed, temperature=0.8):
        gen = self.coord.client.generate("gpt2", prompt_ids, max_tokens=max_tokens,
                                         temperature=temperature, seed=seed,
                                         stop_token_ids=[EOT])
        ids = list(gen)
        return self.decode(ids), gen.finish_reason, len(ids)

    # -- /v1/completions -----------------------------------------------------

    def test_a_completion_is_the_grpc_paths_tokens_as_text(self):
        want, finish, n = self.grpc_text([15496, 995], 12, seed=5)  # "Hello world"
        out = self.ok("/v1/completions", {"model": "gpt2", "prompt": "Hello world",
                                          "max_tokens": 12, "temperature": 0.8, "seed": 5})
        self.assertEqual(out["object"], "text_completion")
        self.assertTrue(out["id"].startswith("cmpl-"))
        self.assertEqual(out["choices"][0]["text"], want)
        self.assertEqual(out["choices"][0]["finish_reason"], finish)
        self.assertEqual(out["usage"], {"prompt_tokens": 2, "completion_tokens": n,
                                        "total_tokens": 2 + n})
        # Token ids in, the same text out.
        by_ids = self.ok("/v1/completions", {"model": "gpt2", "prompt": [15496, 995],
                                             "max_tokens": 12, "temperature": 0.8, "seed": 5})
        self.assertEqual(by_ids["choices"][0]["text"], want)

    def test_streamed_chunks_add_up_to_the_whole_with_usage_and_done(self):
        body = {"model": "gpt2", "prompt": "The pipeline", "max_tokens": 10, "seed": 9}
        whole = self.ok("/v1/completions", body)
        events = self.events("/v1/completions", dict(body, stream=True))
        self.assertEqual(events[-1], "[DONE]")
        chunks = [json.loads(e) for e in events[:-1]]
        self.assertEqual("".join(c["choices"][0]["text"] for c in chunks),
                         whole["choices"][0]["text"])
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "length")
        self.assertEqual(chunks[-1]["usage"], whole["usage"])
        self.assertTrue(all("usage" not in c for c in chunks[:-1]))
        self.assertEqual({c["id"] for c in chunks}, {chunks[0]["id"]})
        # stream_options.include_usage: usage on a chunk of its own, no choices.
        events = self.events("/v1/completions", dict(body, stream=True,
                                                     stream_options={"include_usage": True}))
        last = json.loads(events[-2])
        self.assertEqual((last["choices"], last["usage"]), ([], whole["usage"]))

    def test_n_choices_prompt_lists_and_echo(self):
        out = self.ok("/v1/completions", {"model": "gpt2", "prompt": ["Hello world", [15496]],
                                          "n": 2, "max_tokens": 5, "seed": 40, "echo": True,
                                          "temperature": 0.8})
        texts = [c["text"] for c in out["choices"]]
        self.assertEqual([c["index"] for c in out["choices"]], [0, 1, 2, 3])
        # Choice k draws with seed + k.
        for k, (prompt, text) in enumerate([([15496, 995], "Hello world"),
                                            ([15496, 995], "Hello world"),
                                            ([15496], "Hello"), ([15496], "Hello")]):
            self.assertEqual(texts[k], text + self.grpc_text(prompt, 5, seed=40 + k)[0])
        self.assertEqual(out["usage"]["prompt_tokens"], 3)
        self.assertEqual(out["usage"]["completion_tokens"], 20)
        streamed = self.events("/v1/completions", {"model": "gpt2", "prompt": "Hello world",
                                                   "n": 3, "max_tokens": 5, "seed": 40,
                                                   "temperature": 0.8, "stream": True})
        by_choice = {}
        for e in streamed[:-1]:
            c = json.loads(e)["choices"][0]
            by_choice[c["index"]] = by_choice.get(c["index"], "") + c["text"]
        with_usage = [json.loads(e) for e in streamed[:-1] if "usage" in json.loads(e)]
        self.assertEqual(len(with_usage), 1, "the usage comes once, on the last chunk")
        self.assertEqual(with_usage[0], json.loads(streamed[-2]))
        self.assertEqual(with_usage[0]["usage"]["completion_tokens"], 15)
        self.assertEqual([by_choice[k] for k in range(3)],
                         [t[len("Hello world"):] for t in texts[:2]] +
                         [self.grpc_text([15496, 995], 5, seed=42)[0]])

    def test_a_stop_string_cuts_the_text_before_it(self):
        body = {"model": "gpt2", "prompt": "Hello world", "max_tokens": 24, "temperature": 0}
        text = self.ok("/v1/completions", body)["choices"][0]["text"]
        stop = text[len(text) // 2:len(text) // 2 + 3]
        self.assertTrue(stop.strip(), text)
        out = self.ok("/v1/completions", dict(body, stop=[stop, "never-there"]))
        self.assertEqual(out["choices"][0]["text"], text[:text.find(stop)])
        self.assertEqual(out["choices"][0]["finish_reason"], "stop")
        events = self.events("/v1/completions", dict(body, stop=stop, stream=True))
        self.assertEqual("".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]),
                         text[:text.find(stop)])

    def test_triton_generate_takes_text_input(self):
        want, finish, n = self.grpc_text([15496, 995], 8, seed=3)
        out = self.ok("/v2/models/gpt2/generate", {"text_input": "Hello world", "max_tokens": 8,
                                                   "temperature": 0.8, "seed": 3})
        self.assertEqual((out["text_output"], out["finish_reason"], out["completion_tokens"]),
                         (want, finish, n))
        events = [json.loads(e) for e in self.events(
            "/v2/models/gpt2/generate_stream",
            {"text_input": "Hello world", "parameters": {"max_tokens": 8, "temperature": 0.8,
                                                         "seed": 3}})]
        self.assertEqual("".join(e["text_output"] for e in events), want)
        self.assertEqual(events[-1]["prompt_tokens"], 2)

    def test_triton_generate_takes_tensorrt_llm_keys(self):
        # As TensorRT-LLM's Triton examples send them: stop_words, and
        # bad_words "" and pad_id, which change nothing here.
        body = {"text_input": "Hello world", "max_tokens": 24, "temperature": 0}
        text = self.ok("/v2/models/gpt2/generate", body)["text_output"]
        stop = text[len(text) // 2:len(text) // 2 + 3]
        self.assertTrue(stop.strip(), text)
        trt = dict(body, stop_words=[stop], bad_words="", pad_id=0)
        out = self.ok("/v2/models/gpt2/generate", trt)
        self.assertEqual((out["text_output"], out["finish_reason"]),
                         (text[:text.find(stop)], "stop"))
        events = [json.loads(e) for e in self.events("/v2/models/gpt2/generate_stream", trt)]
        self.assertEqual("".join(e["text_output"] for e in events), text[:text.find(stop)])
        # end_id: a stop token (the first one generated ends it at once).
        first = list(self.coord.client.generate("gpt2", [15496, 995], max_tokens=1))[0]
        out = self.ok("/v2/models/gpt2/generate", dict(body, end_id=first))
        self.assertEqual((out["completion_tokens"], out["finish_reason"]), (1, "stop"))
        for bad, why in (({"bad_words": ["x"]}, "not supported"),
                         ({"stop_words": 5}, "a string or a list"),
                         ({"end_id": "2"}, "an integer")):
            status, data = self.post("/v2/models/gpt2/generate", dict(body, **bad))
            self.assertEqual(status, 400, data)
            self.assertIn(why, json.loads(data)["error"])
        status, data = self.post("/v2/models/gpt2/generate",
                                 {"input_ids": [1, 2], "stop_words": ["x"]})
        self.assertEqual(status, 400, data)
        self.assertIn("stop_words", json.loads(data)["error"])

    # -- SentencePiece and chat -----------------------------------------------

    def needs_sentencepiece(self):
        if not self.sentencepiece:
            self.skipTest("a sanitized coordinator cannot load libsentencepiece")

    def test_sentencepiece_text_is_what_sentencepiece_decodes(self):
        self.needs_sentencepiece()
        prompt = "the model serves tokens"
        ids = [1] + self.sp.encode(prompt)  # Llama's BOS first
        gen = self.coord.client.generate("llama", ids, max_tokens=10, temperature=0.8, seed=8,
                                         stop_token_ids=[2])
        out_ids = list(gen)
        want = self.sp.decode(ids + out_ids)[len(self.sp.decode(ids)):]
        out = self.ok("/v1/completions", {"model": "llama", "prompt": prompt, "max_tokens": 10,
                                          "temperature": 0.8, "seed": 8})
        self.assertEqual(out["choices"][0]["text"], want)
        self.assertEqual(out["usage"]["prompt_tokens"], len(ids))

    def test_chat_renders_the_template_and_completes_it(self):
        self.needs_sentencepiece()
        messages = [{"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hello world"}]
        chat = self.ok("/v1/chat/completions", {"model": "llama", "messages": messages,
                                                "max_tokens": 8, "seed": 2})
        rendered = "System: be brief User: hello world Assistant:"
        plain = self.ok("/v1/completions", {"model": "llama", "prompt": rendered,
                                            "max_tokens": 8, "seed": 2})
        self.assertEqual(chat["object"], "chat.completion")
        self.assertEqual(chat["choices"][0]["message"],
                         {"role": "assistant", "content": plain["choices"][0]["text"]})
        self.assertEqual(chat["usage"], plain["usage"])
        events = self.events("/v1/chat/completions", {"model": "llama", "messages": messages,
                                                      "max_tokens": 8, "seed": 2, "stream": True})
        chunks = [json.loads(e) for e in events[:-1]]
        self.assertEqual(chunks[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        self.assertEqual(chunks[0]["object"], "chat.completion.chunk")
        self.assertEqual("".join(c["choices"][0]["delta"].get("content", "") for c in chunks),
                         plain["choices"][0]["text"])
        # A role the template lacks, a model without a template.
        status, data = self.post("/v1/chat/completions", {
            "model": "llama", "messages": [{"role": "tool", "content": "x"}]})
        self.assertEqual(status, 400)
        self.assertIn('role "tool" is not in the chat template of "llama" (it has assistant, '
                      'system, user)', json.loads(data)["error"]["message"])
        status, data = self.post("/v1/chat/completions", {
            "model": "gpt2", "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual(status, 400)
        self.assertIn("without a chat template", json.loads(data)["error"]["message"])

    # -- models, errors, the Node client ---------------------------------------

    def test_models_lists_those_with_a_tokenizer(self):
        self.needs_sentencepiece()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("GET", "/v1/models")
        listed = json.loads(conn.getresponse().read())
        self.assertEqual(listed["object"], "list")
        self.assertEqual(sorted(m["id"] for m in listed["data"]), ["gpt2", "llama"])
        conn.request("GET", "/v1/models/gpt2")
        self.assertEqual(json.loads(conn.getresponse().read())["id"], "gpt2")
        conn.request("GET", "/v1/models/ids")
        resp = conn.getresponse()
        self.assertEqual(resp.status, 404, resp.read())
        conn.close()

    def test_bad_requests_get_openais_error_object(self):
        cases = [
            ({"model": "gpt2", "prompt": "x", "max_token": 3}, 400,
             'unrecognized request argument "max_token"'),
            ({"model": "gpt2", "prompt": "x", "logprobs": 2}, 400,
             '"logprobs" is not supported'),
            ({"model": "gpt2", "prompt": "x", "temperature": "hot"}, 400,
             '"temperature" must be a number'),
            ({"model": "gpt2", "prompt": "x", "n": 0}, 400, '"n" must be in [1, 64]'),
            ({"model": "gpt2"}, 400, '"prompt" is missing'),
            ({"model": "gpt2", "prompt": ""}, 400, "prompt 0 is empty"),
            ({"model": "gpt2", "prompt": [60000]}, 400, "60000"),
            ({"model": "gpt2", "prompt": "x", "max_tokens": 500}, 400, "positions"),
            ({"model": "nope", "prompt": "x"}, 404, '"nope"'),
            ({"model": "ids", "prompt": "x"}, 400, "uploaded without a tokenizer"),
        ]
        cases.append(({"model": "gpt2", "prompt": [1] * 200, "n": 64}, 400,
                      "prompt 0: a prompt of 200 tokens"))
        for body, status, message in cases:
            for stream in (False, True):  # checked before a stream starts
                got, data = self.post("/v1/completions", dict(body, stream=stream))
                self.assertEqual(got, status, (body, stream, data))
                err = json.loads(data)["error"]
                self.assertIn(message, err["message"], body)
                self.assertEqual(err["type"], "not_found_error" if status == 404
                                 else "invalid_request_error")

    def test_a_tokenizer_that_does_not_fit_the_model_is_refused_at_upload(self):
        path = os.path.join(self.tmp, "small.psm")
        pipeserve.export(tm.Gpt2(max_len=32).eval(), (torch.randint(0, 97, (1, 5)),), path,
                         generation=True)
        with self.assertRaises(pipeserve.ServerError) as e:
            self.coord.client.upload("small", path, tokenizer=GPT2_FILES)
        self.assertIn("it has 50257 tokens, more than the vocabulary of \"small\" (97)",
                      str(e.exception))
        path = os.path.join(self.tmp, "mlp.psm")
        pipeserve.export(models.MLPModule(8).eval(), (torch.randn(4, 8),), path)
        with self.assertRaises(pipeserve.ServerError) as e:
            self.coord.client.upload("mlp", path, tokenizer=GPT2_FILES)
        self.assertIn("a tokenizer is for models exported for generation", str(e.exception))

    def test_openais_node_client(self):
        self.needs_sentencepiece()
        lock = os.path.join(ROOT, "tests/openai_client/package-lock.json")
        with open(lock, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        base = os.environ.get("PIPESERVE_NODE_DIR") or os.path.join(
            os.path.expanduser("~"), ".cache", "pipeserve-node")
        node_modules = os.path.join(base, digest, "node_modules")
        self.assertTrue(os.path.isdir(os.path.join(node_modules, "openai")),
                        f"{node_modules} lacks openai: run tools/bootstrap.sh")
        script = os.path.join(self.tmp, "run.mjs")  # beside a node_modules link
        with open(os.path.join(ROOT, "tests/openai_client/run.mjs")) as f, open(script, "w") as g:
            g.write(f.read())
        if not os.path.exists(os.path.join(self.tmp, "node_modules")):
            os.symlink(node_modules, os.path.join(self.tmp, "node_modules"))
        args = {"base_url": f"http://127.0.0.1:{self.port}/v1", "model": "gpt2",
                "prompt": "Hello world", "max_tokens": 8, "seed": 21,
                "chat_model": "llama", "chat": "hello world"}
        run = subprocess.run(["node", script, json.dumps(args)], capture_output=True, text=True,
                             timeout=120)
        self.assertEqual(run.returncode, 0, run.stderr)
        out = json.loads(run.stdout)
        want, finish, n = self.grpc_text([15496, 995], 8, seed=21)
        self.assertEqual(out["completion"]["text"], want)
        self.assertEqual(out["completion"]["finish_reason"], finish)
        self.assertEqual(out["completion"]["usage"]["completion_tokens"], n)
        self.assertEqual(out["stream"]["text"], want)
        self.assertGreater(out["stream"]["chunks"], 1)
        self.assertEqual(out["stream"]["usage"], out["completion"]["usage"])
        chat = self.ok("/v1/chat/completions", {
            "model": "llama", "messages": [{"role": "user", "content": "hello world"}],
            "max_tokens": 8, "temperature": 0.8, "seed": 21})
        self.assertEqual(out["chat"]["content"], chat["choices"][0]["message"]["content"])
        self.assertEqual(out["chat_stream"]["content"], out["chat"]["content"])
        self.assertEqual(out["chat_stream"]["usage"], chat["usage"])
        self.assertEqual(out["missing"]["status"], 404)
        self.assertEqual(out["models"], ["gpt2", "llama"])

    def test_a_client_that_hangs_up_mid_stream_frees_its_blocks(self):
        self.coord.assert_hang_up_frees_blocks(
            self, self.port, "/v1/completions",
            {"model": "gpt2", "prompt": "Hello", "max_tokens": 80, "stream": True}, "gpt2")


if __name__ == "__main__":
    unittest.main()
