"""Makes an exported causal language model cache-aware (export(generation=True)).

The rewrite works on the converted pipeserve graph (proto/model.proto), whose
ops are few and normalised, rather than on PyTorch code:

  * Every attention of the form matmul(q, k^T) -> [* or / a number] ->
    [masked by where(mask, fill, .) or + mask] -> softmax(-1) -> matmul(., v)
    (casts and identities in between seen through) becomes one
    "cached_attention" node reading q, and k and v from before a
    grouped-query repeat (unsqueeze -> expand -> reshape), so the cache
    holds the KV heads only. The model's own mask is dropped: the cache
    applies causality per sequence, aligned to each token's position.
  * Positions: arange(T) becomes the kv_positions input, and a table sliced
    to the sequence (rotary cos/sin, table[:T]) becomes a gather at each
    token's position.
  * Whatever else still depends on the sequence length (a causal-mask
    buffer or full((T, T)) that no attention consumed, a softmax that is
    not part of a recognised attention) makes the export fail, naming the
    node and why: a guess would give wrong tokens silently.

The graph then runs a step of many sequences with their tokens packed along
dim 1 ([1, T]); see GenerationSpec in proto/model.proto for its inputs.
"""

from .model_file import model_pb2

BLOCK_SIZE = 16
META_INPUTS = ("kv_positions", "kv_seq", "kv_blocks", "kv_seq_ids")
# What the last stage samples with (proto/model.proto, GenerationSpec):
# (name, dtype, shape), all replicated.
SAMPLE_INPUTS = (
    ("sample_floats", model_pb2.DT_FLOAT32, [-1, 4]),  # temperature, top_p, repetition, frequency
    ("sample_ints", model_pb2.DT_INT64, [-1, 3]),      # top_k, seed, tokens generated so far
    ("sample_context", model_pb2.DT_INT64, [-1]),       # the contexts of sequences with penalties
    ("sample_context_ends", model_pb2.DT_INT64, [-1]),  # where each sequence's ends in it
    ("logits_rows", model_pb2.DT_INT64, [-1]),          # the logits rows to send back
)
_SEEN_THROUGH = ("identity", "cast")
_SIZE_DEPENDENT = ("arange", "full", "triu", "tril", "slice", "expand", "zeros", "ones")


class GenerationError(Exception):
    """The model cannot be made cache-aware; the message names the node."""


def make_cache_aware(graph, shapes, tokens, logits=None):
    """Rewrites `graph` (model_pb2.Graph) in place.

    Args:
      graph: the converted graph of a causal LM taking int64 token ids
        [batch, seq] (seq a dynamic dim) as input `tokens`.
      shapes: value name -> shape in the export's first example.
      tokens: the token input's name.
      logits: the logits output's name (default: the first output).

    Returns:
      The set of parameter FQNs the rewritten graph still reads.
    """
    _check_inputs(graph, tokens)
    logits = logits or graph.outputs[0]
    if logits not in graph.outputs:
        raise GenerationError(f"generation: logits output '{logits}' is not an output "
                              f"of the model (outputs: {list(graph.outputs)})")
    seq_len = shapes[tokens][1]
    layers = _rewrite_attention(graph, shapes)
    max_positions = _rewrite_positions(graph, shapes)
    last_only = _rewrite_last_position(graph, shapes, seq_len)
    logits_shape = shapes[logits]
    if not last_only and _project_last_tokens_only(graph, shapes, logits, seq_len):
        # Only the rows sampled from are projected to the vocabulary and
        # sent back: a prefill chunk of T tokens costs one row, not T.
        last_only = True
        logits_shape = (shapes[tokens][0], logits_shape[-1])
    _prune(graph)
    if last_only:
        sampled = _sample_on_the_last_stage(graph, logits)
        _mark_unbatched_downstream(graph)
    _check_no_length_left(graph, shapes)
    batch = shapes[tokens][0]
    if (last_only and (len(logits_shape) != 2 or logits_shape[0] != batch)) or \
            (not last_only and (len(logits_shape) != 3 or logits_shape[1] != seq_len)):
        raise GenerationError(
            f"generation: output '{logits}' has shape {list(logits_shape)} for tokens "
            f"{list(shapes[tokens])}; the logits of every position [batch, seq, vocab], or "
            "of the last one (x[:, -1]) [batch, vocab], are needed")
    for name in META_INPUTS + (("kv_last",) if last_only else ()):
        graph.inputs.add(name=name, dtype=model_pb2.DT_INT64,
                         shape=[-1, -1] if name == "kv_blocks" else [-1], batched=False)
    spec = graph.generation
    spec.tokens = tokens
    spec.logits = logits
    if last_only:
        for name, dtype, shape in SAMPLE_INPUTS:
            graph.inputs.add(name=name, dtype=dtype, shape=shape, batched=False)
        spec.logits, spec.sampled_tokens = sampled
    spec.last_only = last_only
    spec.block_size = BLOCK_SIZE
    spec.max_positions = max_positions
    spec.layers = layers
    spec.vocab = logits_shape[-1]
    return {n.attrs["fqn"].s for n in graph.nodes if n.op == "param"}


def _check_inputs(graph, tokens):
    names = [v.name for v in graph.inputs]
    if tokens not in names:
        raise GenerationError(f"generation: no input '{tokens}' (inputs: {names})")
    if len(names) != 1:
        raise GenerationError(f"generation: the model must take token ids only; it "
                              f"takes {names}")
    clash = set(META_INPUTS) & set(names)
    if clash:
        raise GenerationError(f"generation: input names {sorted(clash)} are reserved")
    spec = graph.inputs[0]
    if spec.dtype != model_pb2.DT_INT64 or len(spec.shape) != 2 or spec.shape[1] != -1:
        raise GenerationError(
            f"generation: input '{tokens}' must be int64 token ids [batch, seq] with seq "
            f"a dynamic dim (dynamic_dims={{'{tokens}': [1]}}); it is "
            f"{model_pb2.DataType.Name(spec.dtype)} {list(spec.shape)}")


class _Index:
    def __init__(self, graph):
        self.node = {n.name: n for n in graph.nodes}
        self.readers = {}
        for n in graph.nodes:
            for v in n.inputs:
                self.readers[v] = self.readers.get(v, 0) + 1
        for v in graph.outputs:
            self.readers[v] = self.readers.get(v, 0) + 1

    def op(self, value):
        n = self.node.get(value)
        return n.op if n is not None else ""

    def back(self, value):
        """Through identities and casts read once."""
        while self.op(value) in _SEEN_THROUGH and self.readers.get(value) == 1:
            value = self.node[value].inputs[0]
        return value


def _where(n):
    return f"node '{n.name}'" + (f" at module path '{n.module_path}'" if n.module_path else "")


def _scalar(idx, n, operand):
    """The number a mul/div multiplies or divides by, or None."""
    if "scalar" in n.attrs and len(n.inputs) == 1:
        reverse = "reverse" in n.attrs and n.attrs["reverse"].i
        return None if reverse else n.attrs["scalar"].f
    if len(n.inputs) == 2 and n.inputs[0] == operand:
        c = idx.node.get(n.inputs[1])
        if c is not None and c.op == "full" and len(c.attrs["shape"].ints.v) == 0 \
                and not any(k.endswith("_from") for k in c.attrs):
            return c.attrs["value"].f
    return None


def _match_attention(idx, last, shapes):
    """(q, k, v, scale) of the attention ending at matmul `last`, or None."""
    p = idx.back(last.inputs[0])
    softmax = idx.node.get(p)
    if softmax is None or softmax.op != "softmax" or idx.readers.get(p) != 1:
        return None
    rank = len(shapes.get(softmax.inputs[0], ()))
    dim = softmax.attrs["dim"].i if "dim" in softmax.attrs else -1
    if dim not in (-1, rank - 1):
        return None
    s = idx.back(softmax.inputs[0])
    masked = idx.node.get(s)
    # where(mask, fill, scores), where(mask, scores, fill) or scores + mask:
    # the scores are the operand made by the scale or the matmul.
    if masked is not None and masked.op in ("where", "add") and \
            len(masked.inputs) == (3 if masked.op == "where" else 2):
        operands = masked.inputs[1:] if masked.op == "where" else masked.inputs
        made = [v for v in operands if idx.op(idx.back(v)) in ("mul", "div", "matmul")]
        if len(made) != 1:
            return None
        s = made[0]
    scale = 1.0
    s = idx.back(s)  # a cast to the mask's type
    scaled = idx.node.get(s)
    if scaled is not None and scaled.op in ("mul", "div"):
        v = _scalar(idx, scaled, scaled.inputs[0])
        if v is not None:
            scale = v if scaled.op == "mul" else 1.0 / v
            s = idx.back(scaled.inputs[0])
    scores = idx.node.get(s)
    if scores is None or scores.op != "matmul":
        return None
    kt = idx.node.get(scores.inputs[1])
    if kt is None or kt.op != "permute" or list(kt.attrs["dims"].ints.v) != [0, 1, 3, 2]:
        return None
    return scores.inputs[0], kt.inputs[0], last.inputs[1], scale


def _before_repeat(idx, value):
    """k or v from before a grouped-query repeat: reshape(expand(unsqueeze(x, 2)))."""
    r = idx.node.get(value)
    if r is None or r.op != "reshape":
        return value
    e = idx.node.get(r.inputs[0])
    if e is None or e.op != "expand":
        return value
    u = idx.node.get(e.inputs[0])
    if u is None or u.op != "unsqueeze" or u.attrs["dim"].i != 2:
        return value
    return u.inputs[0]


def _rewrite_attention(graph, shapes):
    idx = _Index(graph)
    layer = 0
    matched = set()
    for n in list(graph.nodes):
        if n.op != "matmul":
            continue
        m = _match_attention(idx, n, shapes)
        if m is None:
            continue
        q, k, v, scale = m
        k, v = _before_repeat(idx, k), _before_repeat(idx, v)
        qs, ks, vs = shapes.get(q, ()), shapes.get(k, ()), shapes.get(v, ())
        if len(qs) != 4 or len(ks) != 4 or ks != vs or qs[3] != ks[3] or qs[1] % ks[1]:
            raise GenerationError(
                f"generation: attention at {_where(n)} has q {list(qs)}, k {list(ks)}, "
                f"v {list(vs)}; the cache needs [batch, heads, seq, head_dim] with the "
                "query heads a multiple of the key/value heads")
        matched.add(idx.back(n.inputs[0]))  # the softmax
        inputs = [q, k, v] + list(META_INPUTS)
        del n.inputs[:]
        n.inputs.extend(inputs)
        n.op = "cached_attention"
        n.attrs.clear()
        n.attrs["scale"].f = scale
        n.attrs["layer"].i = layer
        n.attrs["block_size"].i = BLOCK_SIZE
        n.attrs["heads"].i = qs[1]
        n.attrs["kv_heads"].i = ks[1]
        n.attrs["head_dim"].i = ks[3]
        layer += 1
    for n in graph.nodes:
        if n.op == "softmax" and n.name not in matched:
            raise GenerationError(
                f"generation: softmax {_where(n)} is not part of a recognised attention "
                "(matmul(q, k^T) -> scale -> mask -> softmax(-1) -> matmul(., v)), so its "
                "keys and values cannot be cached")
    if layer == 0:
        raise GenerationError("generation: the model has no recognised attention")
    return layer


def _rewrite_positions(graph, shapes):
    """arange(T) -> kv_positions; table[:T] -> table gathered at kv_positions."""
    idx = _Index(graph)
    max_positions = 0
    for n in list(graph.nodes):
        if n.op == "arange" and "end_from" in n.attrs:
            start = n.attrs["start"].i if "start" in n.attrs else 0
            step = n.attrs["step"].i if "step" in n.attrs else 1
            if start != 0 or step != 1 or "start_from" in n.attrs:
                raise GenerationError(f"generation: arange {_where(n)} does not count "
                                      "positions from 0 by 1")
            dtype = n.attrs["dtype"].i if "dtype" in n.attrs else model_pb2.DT_INT64
            del n.inputs[:]
            n.inputs.append("kv_positions")
            n.attrs.clear()
            if dtype == model_pb2.DT_INT64:
                n.op = "identity"
            else:
                n.op = "cast"
                n.attrs["dtype"].i = dtype
        elif n.op == "slice" and "stop_from" in n.attrs:
            table = idx.node.get(n.inputs[0])
            if table is None or table.op != "param":
                continue  # a mask sliced to the length: left to the checks below
            dim = n.attrs["dim"].i if "dim" in n.attrs else 0
            start = n.attrs["start"].i if "start" in n.attrs else 0
            if dim != 0 or start != 0 or len(shapes.get(n.inputs[0], ())) != 2:
                continue
            max_positions = shapes[n.inputs[0]][0] if not max_positions else \
                min(max_positions, shapes[n.inputs[0]][0])
            src = n.inputs[0]
            del n.inputs[:]
            n.inputs.extend(["kv_positions", src])
            n.op = "embedding"
            n.attrs.clear()
    for n in graph.nodes:  # position embeddings: embedding(arange(T)), also reshaped
        if n.op == "embedding" and _counts_positions(idx, n.inputs[0]):
            rows = shapes.get(n.inputs[1], (0,))[0]
            max_positions = rows if not max_positions else min(max_positions, rows)
    return max_positions


# Ops that keep each position's value where it was (arange(T).unsqueeze(0),
# as Hugging Face models write it, or a view of it).
_SAME_VALUES = ("identity", "cast", "unsqueeze", "reshape", "view", "expand", "squeeze")


def _counts_positions(idx, value):
    """Whether `value` is kv_positions, seen through ops that only reshape."""
    while value != "kv_positions":
        node = idx.node.get(value)
        if node is None or node.op not in _SAME_VALUES or not node.inputs:
            return False
        value = node.inputs[0]
    return True


def _sample_on_the_last_stage(graph, logits):
    """Each sequence's next token sampled where its logits are made (the
    last stage), so only token ids travel back: sample_tokens(logits, ...)
    -> next_tokens. The logits leave only for the rows `logits_rows` names
    (none in generation steps; tests and ModelInfer ask for them). Returns
    the names of the two outputs (logits kept, next tokens)."""
    sample = model_pb2.Node(name="sample_tokens", op="sample_tokens",
                            inputs=[logits] + [name for name, _, _ in SAMPLE_INPUTS[:4]],
                            outputs=["next_tokens"])
    kept = model_pb2.Node(name="logits_kept", op="embedding", inputs=["logits_rows", logits],
                          outputs=["logits_kept"])
    sample.unbatched = kept.unbatched = True
    graph.nodes.extend([sample, kept])
    outputs = [("logits_kept" if o == logits else o) for o in graph.outputs]
    del graph.outputs[:]
    graph.outputs.extend(outputs + ["next_tokens"])
    return "logits_kept", "next_tokens"


def _gather_last(name, x, module_path):
    """Nodes computing each sequence's last token's row of x [1, T, ...]:
    select(x, 0, 0) -> [T, ...], then embedding(kv_last, .) -> [N, ...]."""
    tokens = model_pb2.Node(name=f"{name}_tokens", op="select", inputs=[x],
                            outputs=[f"{name}_tokens"], module_path=module_path)
    tokens.attrs["dim"].i = 0
    tokens.attrs["index"].i = 0
    last = model_pb2.Node(name=f"{name}_last", op="embedding", inputs=["kv_last", tokens.name],
                          outputs=[f"{name}_last"], module_path=module_path)
    # Their dim 0 is tokens, then sequences: not the batch.
    tokens.unbatched = last.unbatched = True
    return tokens, last


def _mark_unbatched_downstream(graph):
    """Whatever is computed from a value whose dim 0 is not the batch (the
    gathered rows) has no batch dim 0 either: so marked, its rows are not
    checked against the request's."""
    free = set()
    for n in graph.nodes:
        if n.unbatched or any(v in free for v in n.inputs):
            n.unbatched = True
            free.update(n.outputs)


def _replace_nodes(graph, nodes):
    kept = [model_pb2.Node() for _ in nodes]
    for dst, src in zip(kept, nodes):
        dst.CopyFrom(src)
    del graph.nodes[:]
    graph.nodes.extend(kept)


def _project_last_tokens_only(graph, shapes, logits, seq_len):
    """logits = linear(x [B, T, d]) -> linear(x at each sequence's last
    token). False (nothing changed) for logits made otherwise."""
    node = next((n for n in graph.nodes if logits in n.outputs), None)
    if node is None or node.op not in ("linear", "matmul", "mm"):
        return False
    x = shapes.get(node.inputs[0], ())
    if len(x) != 3 or x[1] != seq_len:
        return False
    nodes = []
    for n in list(graph.nodes):
        if n is node:
            tokens, last = _gather_last(n.name, n.inputs[0], n.module_path)
            nodes += [tokens, last]
            n.inputs[0] = last.name
        nodes.append(n)
    _replace_nodes(graph, nodes)
    return True


def _rewrite_last_position(graph, shapes, seq_len):
    """x[:, -1] (the last position's activations) -> each sequence's last
    token, gathered at kv_last from the step's packed tokens. True if any."""
    nodes, found = [], False
    for n in list(graph.nodes):
        shape = shapes.get(n.inputs[0], ()) if n.inputs else ()
        dim = n.attrs["dim"].i if "dim" in n.attrs else None
        if n.op == "select" and len(shape) >= 3 and dim in (1, 1 - len(shape)) and \
                n.attrs["index"].i == -1 and shape[1] == seq_len:
            tokens, _ = _gather_last(n.name, n.inputs[0], n.module_path)
            nodes.append(tokens)
            del n.inputs[:]
            n.inputs.extend(["kv_last", tokens.name])
            n.op = "embedding"
            n.attrs.clear()
            found = True
        nodes.append(n)
    if found:
        _replace_nodes(graph, nodes)
    return found


def _prune(graph):
    """Drops nodes nothing reads (the old masks and score chains)."""
    live = set(graph.outputs)
    keep = []
    for n in reversed(graph.nodes):
        if n.op == "pipe_split" or any(o in live for o in n.outputs):
            keep.append(n)
            live.update(n.inputs)
    keep.reverse()
    _replace_nodes(graph, keep)


def _check_no_length_left(graph, shapes):
    """Refuses ops whose result still depends on the step's token count in a
    way other than as its own length (a T x T mask, a table sliced to T)."""
    idx = _Index(graph)
    for n in graph.nodes:
        if n.op not in _SIZE_DEPENDENT or not any(k.endswith("_from") for k in n.attrs):
            continue
        if n.op in ("slice", "expand") and idx.op(n.inputs[0]) != "param":
            continue  # an activation's own length: per token already
        raise GenerationError(
            f"generation: {n.op} {_where(n)} depends on the sequence length "
            f"(shape {list(shapes.get(n.name, ()))} in the example) and is not an attention "
            "mask or a position table the cache can take over")
