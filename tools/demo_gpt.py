"""The demo's transformer part: export a small GPT-2-style model (4 layers,
d 64, vocab 1000; random weights; tests/pytorch/transformer_models.Gpt2) with
int64 token ids in and a free sequence length, upload it (cut by its
pipe_split() markers into 3 stages), and send token ids of two lengths
through the KServe v2 API; compare the logits with PyTorch. Then the same
model exported for generation (generation=True): 24 tokens streamed from
the server as they are sampled, against PyTorch's greedy decoding. Last, a
GPT-2-sized vocabulary (50257 tokens, random weights, so its words are
random too) uploaded with GPT-2's real tokenizer files, for the text APIs
(/v1/completions) the demo calls over HTTP next.

    /usr/bin/python3 tools/demo_gpt.py SERVER ADMIN_TOKEN_FILE WORK_DIR
"""
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [os.path.join(ROOT, "client", "python"), os.path.join(ROOT, "tests", "pytorch")]

import pipeserve  # noqa: E402
import transformer_models  # noqa: E402


def main():
    server, token_file, work = sys.argv[1:4]
    token = open(token_file).read().strip()
    torch.manual_seed(0)
    model = transformer_models.Gpt2(vocab=1000, d=64, heads=4, layers=4, max_len=64).eval()
    path = os.path.join(work, "gpt.psm")
    info = pipeserve.export(model, (torch.randint(0, 1000, (2, 8)),), path,
                            dynamic_dims={"idx": [1]})
    print(f"exported {path}: {info.num_stages} stages, inputs {info.input_names} "
          f"(int64 [batch, seq], both free), outputs {info.output_names}")
    with pipeserve.Client(server, token=token) as client:
        client.upload("gpt", path, microbatches=2)
        for batch, seq in ((2, 5), (4, 33)):
            ids = torch.randint(0, 1000, (batch, seq))
            t = time.perf_counter()
            logits, hidden = client.infer("gpt", {"idx": ids.numpy()})
            ms = (time.perf_counter() - t) * 1000
            with torch.no_grad():
                ref_logits, _ = model(ids)
            err = (np.linalg.norm(logits - ref_logits.numpy()) /
                   np.linalg.norm(ref_logits.numpy()))
            print(f"  ids [{batch},{seq}] -> logits {list(logits.shape)} in {ms:.1f} ms; "
                  f"relative error vs PyTorch {err:.2e}; next tokens "
                  f"{logits[:, -1].argmax(-1).tolist()}")
            if err > 1e-4:
                raise SystemExit(f"logits differ from PyTorch ({err:.2e})")
        client.unload("gpt")
        generate(client, model, work)


def generate(client, model, work):
    path = os.path.join(work, "gpt_gen.psm")
    pipeserve.export(model, (torch.randint(0, 1000, (1, 8)),), path, generation=True)
    client.upload("gpt-gen", path)
    prompt = torch.randint(0, 1000, (6,)).tolist()
    t = time.perf_counter()
    stream = client.generate("gpt-gen", prompt, max_tokens=24)
    tokens, first_ms = [], None
    for token in stream:  # each id as the server samples it
        first_ms = first_ms or (time.perf_counter() - t) * 1000
        tokens.append(token)
    ms = (time.perf_counter() - t) * 1000
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(24):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    print(f"  generate: prompt {prompt} -> {len(tokens)} tokens ({stream.finish_reason}) "
          f"streamed in {ms:.0f} ms, first after {first_ms:.0f} ms; same as PyTorch's greedy "
          f"decoding: {tokens == ids[len(prompt):]}")
    if tokens != ids[len(prompt):]:
        raise SystemExit(f"generated {tokens}, PyTorch {ids[len(prompt):]}")
    # gpt-gen stays loaded: the demo streams from it over HTTP next.
    path = os.path.join(work, "gpt2_text.psm")
    pipeserve.export(transformer_models.Gpt2(vocab=50257, d=64, heads=4, layers=2,
                                             max_len=128).eval(),
                     (torch.randint(0, 50257, (1, 8)),), path, generation=True)
    gpt2 = os.path.join(ROOT, "third_party", "gpt2_bpe")
    client.upload("gpt2-text", path,
                  tokenizer={"gpt2_vocab": os.path.join(gpt2, "encoder.json"),
                             "gpt2_merges": os.path.join(gpt2, "vocab.bpe")})
    print("  uploaded gpt2-text with GPT-2's tokenizer (vocab.json + merges.txt)")


if __name__ == "__main__":
    main()
