"""Generation end to end: GPT-2- and Llama-style models (transformer_models.py)
exported with generation=True, cut into 3 and 4 stages, served by a real
coordinator and stage servers, and asked for tokens through
pipeserve.Client.generate; PyTorch's greedy decoding by full recomputation
is the oracle. Each step's logits are checked through ModelInfer on the
cache-aware graph itself (chunked prefill, then decode steps of several
sequences packed together), and a stage server killed mid-generation costs
no sequence and changes no token."""
import os
import signal
import sys
import tempfile
import threading
import time
import unittest

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
sys.path.insert(0, HERE)

import pipeserve  # noqa: E402
import transformer_models as tm  # noqa: E402
from coordinator_process import Coordinator, rss_mib, sanitized  # noqa: E402

TOKENS = 32


def gpt2():
    torch.manual_seed(0)
    return tm.Gpt2(max_len=64).eval()  # 3 stages (pipe_split before h.1 and h.3)


def llama(dtype=None):
    torch.manual_seed(0)
    model = tm.Llama(layers=4, max_len=64, cut=False).eval()  # 4 stages by split_spec
    return model.to(dtype) if dtype is not None else model


class HfAttention(tm.GptAttention):
    """Attention as Hugging Face's GPT-2 writes it: scalar tensors made in
    forward (torch.full([], ...) for the scale, torch.tensor(finfo.min) for
    the mask value) and where(mask, scores, min)."""

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.heads_of(x, B, T, C)
        w = torch.matmul(q, k.transpose(-1, -2))
        w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype)
        causal = self.bias[:, :, :T, :T] > 0
        mask_value = torch.tensor(torch.finfo(w.dtype).min, dtype=w.dtype)
        w = torch.where(causal, w, mask_value)
        w = torch.nn.functional.softmax(w, dim=-1)
        y = torch.matmul(w, v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


def greedy_sampling(n):
    """The last stage's sampling inputs for n sequences sampled greedily,
    with every sequence's logits sent back (proto/model.proto,
    GenerationSpec)."""
    floats = np.zeros((n, 4), np.float32)
    floats[:, 1:3] = 1  # top_p 1, repetition_penalty 1
    return {"sample_floats": floats, "sample_ints": np.zeros((n, 3), np.int64),
            "sample_context": np.zeros(0, np.int64),
            "sample_context_ends": np.zeros(n, np.int64),
            "logits_rows": np.arange(n, dtype=np.int64)}


class HfGpt2LastLogits(tm.Gpt2):
    """HfAttention in every block, and only the last position's logits."""

    def __init__(self):
        super().__init__(max_len=64)
        for block in self.h:
            old = block.attn
            block.attn = HfAttention(32, 4, 64)
            block.attn.load_state_dict(old.state_dict())

    def forward(self, idx):
        _, x = super().forward(idx)
        return self.lm_head(x[:, -1, :])


def hf_gpt2():
    torch.manual_seed(0)
    return HfGpt2LastLogits().eval()


LLAMA_SPLIT = {f"layers.{i}": pipeserve.SplitPoint.BEGINNING for i in (1, 2, 3)}


def logits_of(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    out = (out[0] if isinstance(out, tuple) else out)[0].float()
    return out if out.dim() == 2 else out[None]  # last-position models: [1, vocab]


def greedy(model, prompt, n):
    """PyTorch's greedy decoding by full recomputation, and each step's logits."""
    ids, steps = list(prompt), []
    for _ in range(n):
        row = logits_of(model, ids)[-1]
        steps.append(row.numpy())
        ids.append(int(row.argmax()))
    return ids[len(prompt):], steps


def greedy_penalised(model, prompt, n, repetition, frequency):
    """Greedy decoding by full recomputation with a repetition penalty
    (logits of tokens seen in prompt or output divided by it when positive,
    multiplied when not) and a frequency penalty (subtracted once per
    occurrence in the output), as vLLM and the sampler define them."""
    ids = list(prompt)
    for _ in range(n):
        row = logits_of(model, ids)[-1].double()
        seen = torch.tensor(sorted(set(ids)))
        row[seen] = torch.where(row[seen] > 0, row[seen] / repetition, row[seen] * repetition)
        for t in ids[len(prompt):]:
            row[t] -= frequency
        ids.append(int(row.argmax()))
    return ids[len(prompt):]


def rel_err(out, ref):
    ref = np.asarray(ref, np.float64)
    return np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)


class GenerationTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))
        # ModelInfer on the cache-aware graphs checks each step's logits.
        cls.coord = Coordinator(cls.tmp, "--kv_cache_mb=8", "--allow_generation_infer")
        cls.client = cls.coord.client
        cls.gpt2, cls.llama = gpt2(), llama()
        cls.upload("gpt2", cls.gpt2, 3)
        cls.upload("llama", cls.llama, 4, split_spec=LLAMA_SPLIT)

    @classmethod
    def tearDownClass(cls):
        cls.coord.close()

    @classmethod
    def upload(cls, name, model, stages, split_spec=None, **kwargs):
        path = os.path.join(cls.tmp, f"{name}.psm")
        ids = torch.randint(0, model.lm_head.weight.shape[0], (2, 5))
        info = pipeserve.export(model, (ids,), path, generation=True, split_spec=split_spec)
        assert info.num_stages == stages, info.num_stages
        cls.client.upload(name, path, **kwargs)
        return info

    def generate(self, name, prompt, n, **kwargs):
        stream = self.client.generate(name, prompt, max_tokens=n, **kwargs)
        tokens = list(stream)
        return tokens, stream.finish_reason

    def check_greedy(self, name, model):
        torch.manual_seed(3)
        vocab = model.lm_head.weight.shape[0]
        for length in (1, 7, 20):
            prompt = torch.randint(0, vocab, (length,)).tolist()
            ref, _ = greedy(model, prompt, TOKENS)
            tokens, finish = self.generate(name, prompt, TOKENS)
            self.assertEqual(tokens, ref, f"{name}, prompt of {length}")
            self.assertEqual(finish, "length")

    def test_gpt2_greedy_tokens_equal_pytorchs_on_3_stages(self):
        self.check_greedy("gpt2", self.gpt2)

    def test_llama_greedy_tokens_equal_pytorchs_on_4_stages(self):
        self.check_greedy("llama", self.llama)

    def test_hugging_face_style_model_with_last_position_logits(self):
        model = hf_gpt2()
        self.upload("hf_gpt2", model, 3)
        self.check_greedy("hf_gpt2", model)

    def step(self, name, seqs, blocks_per_seq=4):
        """One step through ModelInfer: seqs is [(seq_id, first position,
        token ids)], every sequence with its own blocks. Returns each
        sequence's last token's logits [N, vocab] as numpy."""
        tokens, positions, seq, table, ids, last = [], [], [], [], [], []
        for i, (sid, start, toks) in enumerate(seqs):
            tokens += toks
            positions += list(range(start, start + len(toks)))
            seq += [i] * len(toks)
            last.append(len(tokens) - 1)
            table.append([(sid % 10) * blocks_per_seq + b for b in range(blocks_per_seq)])
            ids.append(sid)
        out = self.client.infer(name, {
            "idx" if name.startswith("gpt2") else "input_ids": np.array([tokens], np.int64),
            "kv_positions": np.array(positions, np.int64), "kv_seq": np.array(seq, np.int64),
            "kv_blocks": np.array(table, np.int64), "kv_seq_ids": np.array(ids, np.int64),
            "kv_last": np.array(last, np.int64), **greedy_sampling(len(seqs))})
        # The last stage samples too (greedy here): the most likely token.
        np.testing.assert_array_equal(out[-1], out[0].argmax(-1))
        return out[0]

    def check_step_logits(self, name, model):
        """Chunked prefill of two prompts, then decode steps carrying both:
        each sequence's logits at every step against PyTorch's full
        recomputation."""
        vocab = model.lm_head.weight.shape[0]
        torch.manual_seed(4)
        a = torch.randint(0, vocab, (13,)).tolist()
        b = torch.randint(0, vocab, (6,)).tolist()
        base = 1000 + 7 * len(name)  # ids no generation of this test uses
        errors = []
        # a in chunks of 8 and 5, b whole beside a's second chunk.
        got = self.step(name, [(base, 0, a[:8])])
        errors.append(rel_err(got[0], logits_of(model, a[:8])[-1]))
        got = self.step(name, [(base, 8, a[8:]), (base + 1, 0, b)])
        errors.append(rel_err(got[0], logits_of(model, a)[-1]))
        errors.append(rel_err(got[1], logits_of(model, b)[-1]))
        for _ in range(6):  # decode: one token of each per step
            na, nb = int(logits_of(model, a)[-1].argmax()), int(logits_of(model, b)[-1].argmax())
            got = self.step(name, [(base + 1, len(b), [nb]), (base, len(a), [na])])
            a, b = a + [na], b + [nb]
            errors.append(rel_err(got[0], logits_of(model, b)[-1]))
            errors.append(rel_err(got[1], logits_of(model, a)[-1]))
        self.assertEqual(len(errors), 15)
        self.assertLess(max(errors), 1e-4, name)

    def test_every_steps_logits_equal_pytorchs(self):
        self.check_step_logits("gpt2", self.gpt2)
        self.check_step_logits("llama", self.llama)

    def test_bfloat16_logits_stay_close_to_the_float32_reference(self):
        model = llama(torch.bfloat16)
        self.upload("llama_bf16", model, 4, split_spec=LLAMA_SPLIT)
        reference = llama()
        torch.manual_seed(5)
        prompt = torch.randint(0, 89, (9,)).tolist()
        got = self.step("llama_bf16", [(77, 0, prompt)])
        self.assertLess(rel_err(got[0], logits_of(reference, prompt)[-1]), 2e-2)
        tokens, _ = self.generate("llama_bf16", prompt, 8)
        ids = list(prompt)
        for t in tokens:  # each step's logits, on the tokens generated
            got = self.step("llama_bf16", [(78, 0, ids)])
            self.assertLess(rel_err(got[0], logits_of(reference, ids)[-1]), 2e-2)
            ids.append(t)

    def test_seeded_sampling_is_reproducible_alone_and_in_company(self):
        prompt = [5, 17, 3]
        # Hot enough that the draws are not the greedy tokens.
        kwargs = dict(temperature=4.0, top_p=0.95, top_k=60, seed=1234)
        alone, _ = self.generate("gpt2", prompt, 24, **kwargs)
        again, _ = self.generate("gpt2", prompt, 24, **kwargs)
        self.assertEqual(alone, again)
        results = {}

        def other(i):
            results[i] = self.generate("gpt2", [i % 97, 2], 20 + i, temperature=0.7, seed=i)[0]

        threads = [threading.Thread(target=other, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        batched, _ = self.generate("gpt2", prompt, 24, **kwargs)
        for t in threads:
            t.join()
        self.assertEqual(alone, batched)
        self.assertNotEqual(alone, greedy(self.gpt2, prompt, 24)[0])

    def test_penalties_reach_the_last_stage_with_each_sequences_context(self):
        # Sampled on the last stage, which gets each penalised sequence's
        # prompt and output; two at once, one penalised and one not.
        torch.manual_seed(8)
        a, b = torch.randint(0, 97, (9,)).tolist(), torch.randint(0, 97, (4,)).tolist()
        results = {}

        def run(key, prompt, **kw):
            results[key] = self.generate("gpt2", prompt, 20, **kw)[0]

        threads = [threading.Thread(target=run, args=("a", a),
                                    kwargs=dict(repetition_penalty=1.8, frequency_penalty=0.7)),
                   threading.Thread(target=run, args=("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(results["a"], greedy_penalised(self.gpt2, a, 20, 1.8, 0.7))
        self.assertNotEqual(results["a"], greedy(self.gpt2, a, 20)[0])  # the penalties bite
        self.assertEqual(results["b"], greedy(self.gpt2, b, 20)[0])

    def test_concurrent_sequences_each_equal_their_run_alone(self):
        torch.manual_seed(6)
        jobs = [(torch.randint(0, 97, (1 + (i * 5) % 23,)).tolist(), 1 + (i * 7) % 30)
                for i in range(64)]
        results = [None] * len(jobs)

        def run(i):
            results[i] = self.generate("gpt2", *jobs[i])[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, (prompt, n) in enumerate(jobs):
            self.assertEqual(results[i], greedy(self.gpt2, prompt, n)[0], f"sequence {i}")

    def test_a_client_that_hangs_up_frees_its_blocks(self):
        stream = self.client.generate("gpt2", [1, 2, 3], max_tokens=60)
        self.assertEqual(len([next(stream), next(stream)]), 2)
        used = 'pipeserve_kv_cache_blocks{model="gpt2",state="used"}'
        self.assertGreater(self.coord.metric(used), 0)
        stream.close()  # cancels the call
        deadline = time.time() + 10
        while self.coord.metric(used) > 0 and time.time() < deadline:
            time.sleep(0.01)
        self.assertEqual(self.coord.metric(used), 0)

    def test_bad_requests_get_errors_naming_the_problem(self):
        def error(name, prompt, **kwargs):
            with self.assertRaises(pipeserve.ServerError) as e:
                self.generate(name, prompt, kwargs.pop("n", 4), **kwargs)
            return e.exception

        e = error("gpt2", [1, 97])
        self.assertEqual(e.code, "INVALID_ARGUMENT")
        self.assertIn("prompt token 1 is 97, not in [0, 97)", str(e))
        e = error("gpt2", [1] * 40, n=30)
        self.assertIn("the model has 64", str(e))
        self.assertIn("top_p", str(error("gpt2", [1], top_p=1.5)))
        self.assertEqual(error("nope", [1]).code, "NOT_FOUND")
        # The cache-aware graph through ModelInfer with no token row (a
        # batch of 0) beside metadata for 2 tokens: refused before anything
        # is read, and the model serves on.
        with self.assertRaises(pipeserve.ServerError) as e:
            self.client.infer("gpt2", {
                "idx": np.zeros((0, 2), np.int64),
                "kv_positions": np.array([0, 1], np.int64), "kv_seq": np.zeros(2, np.int64),
                "kv_blocks": np.array([[0]], np.int64), "kv_seq_ids": np.array([5], np.int64),
                "kv_last": np.array([1], np.int64), **greedy_sampling(1)})
        self.assertEqual(e.exception.code, "INVALID_ARGUMENT")
        self.assertIn("packed in one row", str(e.exception))
        self.assertEqual(self.generate("gpt2", [1, 2, 3], 5)[0], greedy(self.gpt2, [1, 2, 3], 5)[0])

    def test_a_forward_model_is_refused_for_generation(self):
        path = os.path.join(self.tmp, "plain.psm")
        pipeserve.export(gpt2(), (torch.randint(0, 97, (2, 5)),), path,
                         dynamic_dims={"idx": [1]})
        self.client.upload("plain", path)
        with self.assertRaises(pipeserve.ServerError) as e:
            self.generate("plain", [1, 2], 3)
        self.assertEqual(e.exception.code, "FAILED_PRECONDITION")
        self.assertIn("generation=True", str(e.exception))


def serve_gpt2(*flags, replicas=1):
    """A coordinator of its own started with `flags`, serving gpt2()
    exported for generation as "gpt2"; and the model."""
    tmp = tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))
    coord = Coordinator(tmp, *flags)
    try:
        model = gpt2()
        path = os.path.join(tmp, "gpt2.psm")
        pipeserve.export(model, (torch.randint(0, 97, (2, 5)),), path, generation=True)
        coord.client.upload("gpt2", path, replicas=replicas)
    except BaseException:
        coord.close()
        raise
    return coord, model


class GenerationFailoverTest(unittest.TestCase):
    """kill -9 of a stage server while 16 sequences generate: none fails,
    and every one's tokens are those of the undisturbed run."""

    def run_through_a_kill(self, replicas):
        coord, model = serve_gpt2("--kv_cache_mb=8", replicas=replicas)
        try:
            servers = coord.stage_server_pids()
            self.assertEqual(len(servers), 3 * replicas)
            rss_before = {pid: rss_mib(pid) for pid in servers}
            torch.manual_seed(7)
            prompts = [torch.randint(0, 97, (1 + i % 9,)).tolist() for i in range(16)]
            got = [[] for _ in prompts]
            errors = []

            def run(i):
                try:
                    for t in coord.client.generate("gpt2", prompts[i], max_tokens=40):
                        got[i].append(t)
                except pipeserve.ServerError as e:
                    errors.append((i, e))

            threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
            for t in threads:
                t.start()
            deadline = time.time() + 60
            while sum(map(len, got)) < 16 * 5 and time.time() < deadline:
                time.sleep(0.005)
            # The kill goes to a server whose cache grew (sequences run on
            # its lane: with 2 replicas the generator may keep every
            # sequence on one), at once, before the checks below.
            rss = {pid: rss_mib(pid) for pid in servers}
            victim = max(servers, key=lambda pid: (rss[pid] - rss_before[pid], pid == servers[1]))
            os.kill(victim, signal.SIGKILL)
            killed_at = sum(map(len, got))
            # Weights of well under 1 MiB, a cache budget of 8 MiB: a stage
            # server holds at most 64 MiB beyond them (not under a
            # sanitizer, whose shadow memory counts too).
            for pid in servers:
                if pid != victim and not sanitized(pid):
                    self.assertLess(rss[pid], 1 + 8 + 64, f"stage server {pid}")
            print(f"stage server RSS MiB at start {sorted(rss_before.values())}, "
                  f"generating {sorted(rss.values())}")
            # Without --allow_generation_infer, ModelInfer on a generation
            # model is refused: client-given cache metadata could overwrite
            # these sequences' caches.
            with self.assertRaises(pipeserve.ServerError) as e:
                coord.client.infer("gpt2", {"idx": np.array([[1]], np.int64),
                                            "kv_positions": np.zeros(1, np.int64),
                                            "kv_seq": np.zeros(1, np.int64),
                                            "kv_blocks": np.zeros((1, 1), np.int64),
                                            "kv_seq_ids": np.ones(1, np.int64),
                                            "kv_last": np.zeros(1, np.int64)})
            self.assertEqual(e.exception.code, "FAILED_PRECONDITION")
            self.assertIn("GenerationService/Generate", str(e.exception))
            for t in threads:
                t.join()
            self.assertEqual(errors, [])
            self.assertLess(killed_at, 16 * 40, "the kill came after every token")
            for i, prompt in enumerate(prompts):
                self.assertEqual(got[i], greedy(model, prompt, 40)[0], f"sequence {i}")
            # The sequences lost with the server were prefilled again; every
            # block is free once they are done.
            self.assertGreater(coord.metric('pipeserve_generation_rebuilt_total{model="gpt2"}'), 0)
            self.assertEqual(
                coord.metric('pipeserve_kv_cache_blocks{model="gpt2",state="used"}'), 0)
        finally:
            coord.close()

    def test_a_stage_server_killed_mid_generation_costs_no_token(self):
        self.run_through_a_kill(replicas=1)

    def test_a_replica_killed_mid_generation_costs_no_token(self):
        self.run_through_a_kill(replicas=2)


def generating(client, prompt, n):
    """Starts generating n tokens of `prompt` on a thread and waits for the
    first; returns the thread, the tokens so far and the errors (lists
    that fill as it runs)."""
    got, errors = [], []

    def run():
        try:
            for t in client.generate("gpt2", prompt, max_tokens=n):
                got.append(t)
        except pipeserve.ServerError as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    while not got and thread.is_alive():
        time.sleep(0.005)
    return thread, got, errors


class GenerationReuploadTest(unittest.TestCase):
    """A new upload under a generation model's name while a sequence
    generates: the sequence finishes on the version it started on, whose
    stages hold its cache, with the tokens of an undisturbed run, and the
    next request gets the new version. (A new generation spec ended such
    sequences with UNAVAILABLE; the same spec moved them onto the new
    weights mid-sequence.)"""

    @staticmethod
    def export(tmp, seed, max_len):
        """A GPT-2-style model of 8 layers, slow enough to act on while it
        generates, exported for generation; and the file's path."""
        torch.manual_seed(seed)
        model = tm.Gpt2(d=128, layers=8, max_len=max_len).eval()
        path = os.path.join(tmp, f"gpt2_{seed}.psm")
        pipeserve.export(model, (torch.randint(0, 97, (2, 5)),), path, generation=True)
        return model, path

    def test_a_sequence_finishes_on_its_version_across_an_upload(self):
        tmp = tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))
        coord = Coordinator(tmp)
        try:
            def export(seed, max_len):
                return self.export(tmp, seed, max_len)

            coord.client.upload("gpt2", export(0, 2048)[1])
            prompt, n = [1, 2, 3], 1000
            # Other weights with the same spec, then another spec (max_len).
            for seed, max_len in ((1, 2048), (2, 1024)):
                want = list(coord.client.generate("gpt2", prompt, max_tokens=n))  # undisturbed
                new_model, path = export(seed, max_len)
                thread, got, errors = generating(coord.client, prompt, n)
                coord.client.upload("gpt2", path)
                self.assertEqual(list(coord.client.generate("gpt2", prompt, max_tokens=5)),
                                 greedy(new_model, prompt, 5)[0], "the new version serves")
                at_new = len(got)
                thread.join()
                self.assertEqual(errors, [])
                self.assertLess(at_new, n, "the sequence ended before the new version served")
                self.assertEqual(got, want, f"upload {seed}")
                print(f"upload {seed}: {at_new} of {n} tokens came before the new version served")
        finally:
            coord.close()


    def test_an_idle_generation_models_old_version_closes_at_once(self):
        # Regression: the old version's generator held its deployment until
        # the next generation request, so a replaced version that had
        # generated once waited out --drain_timeout_s with its stages (and
        # their KV caches) loaded.
        coord, _ = serve_gpt2("--drain_timeout_s=600")
        try:
            self.assertEqual(len(list(coord.client.generate("gpt2", [1, 2, 3], max_tokens=3))), 3)
            coord.client.upload("gpt2", os.path.join(coord.tmp, "gpt2.psm"))  # version 2
            deadline = time.time() + 20
            while time.time() < deadline:
                with open(os.path.join(coord.tmp, "coordinator.log")) as f:
                    log = f.read()
                if "version 1 closed" in log:
                    break
                time.sleep(0.05)
            # "has nothing in flight" at the upload, or "has drained" just
            # after (a metrics scrape may hold the generator a moment).
            self.assertRegex(log, "version 1 closed: model \"gpt2\" was replaced by a new upload "
                                  "and (has nothing in flight|has drained)")
            self.assertEqual(len(list(coord.client.generate("gpt2", [1, 2, 3], max_tokens=3))), 3)
        finally:
            coord.close()

    def test_unloading_a_model_ends_its_sequences(self):
        # A sequence generating when its model is unloaded ends at once,
        # UNAVAILABLE naming the unload (its generator is stopped: an upload
        # of the same version number must not find it still stepping).
        tmp = tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))
        coord = Coordinator(tmp)
        try:
            coord.client.upload("gpt2", self.export(tmp, 0, 2048)[1])
            thread, got, errors = generating(coord.client, [1, 2, 3], 2000)
            coord.client.unload("gpt2")
            thread.join(timeout=30)
            self.assertFalse(thread.is_alive(), "the sequence still generates after the unload")
            self.assertLess(len(got), 2000)
            self.assertEqual(len(errors), 1)
            self.assertEqual(errors[0].code, "UNAVAILABLE")
            self.assertIn("\"gpt2\" was unloaded", str(errors[0]))
        finally:
            coord.close()


class GenerationPreemptionTest(unittest.TestCase):
    """A cache too small for every sequence at once: they start on their
    prompts' blocks, take more as they grow, and when none is left the one
    admitted last is preempted and prefilled again later. Every sequence
    still gets exactly PyTorch's greedy tokens, and every block comes back."""

    def test_sequences_preempted_for_cache_resume_with_the_same_tokens(self):
        # 8 KiB per block on the widest stage (2 layers of 32 wide): 16
        # blocks of 16 tokens. 8 sequences of up to 49 positions need 4
        # blocks each, 32 together.
        coord, model = serve_gpt2("--kv_cache_mb=0.125")
        try:
            used = 'pipeserve_kv_cache_blocks{model="gpt2",state="used"}'
            free = 'pipeserve_kv_cache_blocks{model="gpt2",state="free"}'
            torch.manual_seed(8)
            prompts = [torch.randint(0, 97, (2 + i,)).tolist() for i in range(8)]
            got = [None] * len(prompts)
            # All eight ask at once: started one by one on a loaded machine,
            # the first could finish before the last began, and none be
            # preempted.
            start = threading.Barrier(len(prompts))

            def run(i):
                start.wait()
                got[i] = list(coord.client.generate("gpt2", prompts[i], max_tokens=40))

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for i, prompt in enumerate(prompts):
                self.assertEqual(got[i], greedy(model, prompt, 40)[0], f"sequence {i}")
            self.assertEqual(coord.metric(used), 0)
            self.assertLessEqual(coord.metric(free), 16)
            self.assertGreater(
                coord.metric('pipeserve_generation_preemptions_total{model="gpt2"}'), 0)
        finally:
            coord.close()


class GenerationExportTest(unittest.TestCase):
    def export(self, model, example, **kwargs):
        with tempfile.TemporaryDirectory() as d:
            return pipeserve.export(model, example, os.path.join(d, "m.psm"), **kwargs)

    def test_a_model_that_mixes_positions_outside_attention_is_refused(self):
        class MeanOverSequence(torch.nn.Module):  # softmax over positions, not attention
            def __init__(self):
                super().__init__()
                self.emb = torch.nn.Embedding(11, 8)
                self.out = torch.nn.Linear(8, 11)

            def forward(self, ids):
                x = self.emb(ids)
                w = torch.softmax(x.sum(-1, keepdim=True), dim=1)
                return self.out(x * w)

        with self.assertRaises(pipeserve.ExportError) as e:
            self.export(MeanOverSequence().eval(), (torch.randint(0, 11, (2, 5)),),
                        generation=True)
        self.assertIn("softmax", str(e.exception))
        self.assertIn("not part of a recognised attention", str(e.exception))

    def test_the_encoder_is_refused_naming_its_inputs(self):
        model = tm.make("encoder")
        with self.assertRaises(pipeserve.ExportError) as e:
            self.export(model, (torch.randint(0, 61, (2, 5)), torch.zeros(2, 5, dtype=torch.bool)),
                        generation=True)
        self.assertIn("token ids only", str(e.exception))

    def test_positions_written_as_hugging_face_does_give_the_position_limit(self):
        class HfPositions(tm.Gpt2):  # arange(T).unsqueeze(0) into the position table
            def forward(self, idx):
                pos = torch.arange(0, idx.size(1), dtype=torch.long).unsqueeze(0)
                x = self.wte(idx) + self.wpe(pos)
                for block in self.h:
                    x = block(x)
                return self.lm_head(self.ln_f(x))

        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.psm")
            pipeserve.export(HfPositions(max_len=48).eval(), (torch.randint(0, 97, (1, 5)),),
                             path, generation=True)
            graph, _ = pipeserve.load_model(path)
        # Before: 0 (unknown), and an over-long request failed inside a step.
        self.assertEqual(graph.generation.max_positions, 48)

    def test_cache_aware_graph_has_one_cached_attention_per_layer(self):
        info = None
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.psm")
            info = pipeserve.export(llama(), (torch.randint(0, 89, (1, 4)),), path,
                                    generation=True, split_spec=LLAMA_SPLIT)
            graph, tensors = pipeserve.load_model(path)
        cached = [n for n in graph.nodes if n.op == "cached_attention"]
        self.assertEqual(len(cached), 4)
        self.assertEqual({n.attrs["kv_heads"].i for n in cached}, {2})  # cached before the GQA repeat
        self.assertEqual(graph.generation.layers, 4)
        self.assertEqual(graph.generation.max_positions, 64)
        self.assertEqual(info.num_stages, 4)
        self.assertNotIn("triu", {n.op for n in graph.nodes})  # the model's mask is gone
        self.assertEqual(info.input_names, ["input_ids", "kv_positions", "kv_seq", "kv_blocks",
                                            "kv_seq_ids", "kv_last", "sample_floats",
                                            "sample_ints", "sample_context",
                                            "sample_context_ends", "logits_rows"])
        # The last stage samples: only token ids need travel back.
        self.assertEqual(graph.generation.sampled_tokens, "next_tokens")
        # Only each sequence's last token is projected to the vocabulary.
        self.assertTrue(graph.generation.last_only)


if __name__ == "__main__":
    unittest.main()
