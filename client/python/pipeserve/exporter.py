"""Exports a PyTorch module to a pipeserve model file.

`export` traces the module's forward with torch.fx (symbolically: the example
inputs give only input shapes), converts the trace into a `pipeserve.Graph`
(proto/model.proto) of a small set of ops, and writes the graph and every
parameter and buffer it reads to one file (see model_file.py for the layout).
The C++ partitioner cuts that graph into pipeline stages at the `pipe_split()`
markers and at the module boundaries named by `split_spec`.

Usage:

    import torch
    import pipeserve

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0 = torch.nn.Linear(512, 512)
            self.lin1 = torch.nn.Linear(512, 512)

        def forward(self, x):
            x = torch.relu(self.lin0(x))
            pipeserve.pipe_split()          # stage 0 | stage 1
            return self.lin1(x)

    info = pipeserve.export(Model().eval(), (torch.randn(16, 512),),
                            "model.psm")
    assert info.num_stages == 2

Graph conventions (the C++ side relies on them):
  * Inputs are forward's arguments (positional, then keywords), named by the
    argument name. Batched inputs have shape[0] == -1; dynamic_dims are -1
    too.
  * Node names are the FX node names; a node's single output value has the
    node's name. A "param" node is named by its canonical FQN ("lin0.weight")
    and is emitted once, just before the first node that reads it, with that
    node's module_path.
  * Ops: those of graph/op_schema.cc (_ops.py converts each PyTorch
    call). Binary ops with a Python number carry attrs "scalar" (f) and,
    when the number is the left operand, "reverse" (i = 1). Run-time sizes
    are rank-0 int64 values of "size" nodes; an int attribute takes one
    through "<attr>_from" = 1 + the input's index.
  * Every op sees inputs of one dtype: where PyTorch promotes, the exporter
    inserts "cast" nodes first.
  * A node whose output's dim 0 is free but is not the batch (a length) is
    marked `unbatched`.
  * Anything else raises ExportError naming the op or module type and the
    module path where it was called.
"""

import dataclasses
import enum
import inspect
import numbers
import operator
import warnings

import torch
import torch.fx
import torch.nn.functional as F

from . import generation as _generation
from . import model_file
from .model_file import model_pb2

# The tracer of the export in progress, or None in eager mode. pipe_split()
# records itself through it: torch.fx only records calls that take a Proxy,
# and pipe_split takes nothing.
_ACTIVE_TRACER = None


def pipe_split():
    """Marks a cut between two pipeline stages.

    Does nothing when the model runs eagerly; during `export` it records a
    "pipe_split" node at this point of the trace. N markers give N+1 stages
    (markers with nothing between them count once, as in PyTorch).
    """
    tracer = _ACTIVE_TRACER
    if tracer is not None:
        tracer.create_proxy("call_function", pipe_split, (), {})


class SplitPoint(enum.IntEnum):
    """Where split_spec cuts around a module (values of proto SplitPoint)."""
    BEGINNING = 1  # just before the module's first op
    END = 2  # just after its last op


class ExportError(Exception):
    """The module cannot be exported; the message names what and where."""


@dataclasses.dataclass
class ExportInfo:
    """What `export` wrote."""
    num_stages: int
    param_names: list  # every state_dict key, in order, aliases included
    input_names: list  # graph input value names, in order
    output_names: list  # graph output value names, in order
    path: str


def export(module, example_args, path, example_kwargs=None, split_spec=None,
           replicated=(), dynamic_dims=None, generation=False, logits=None):
    """Traces `module` and writes it to `path` as a pipeserve model file.

    Args:
      module: the torch.nn.Module to export. Dropout must be in eval mode.
      example_args: tuple of forward's positional arguments: tensors of
        float32, float16, bfloat16, int64, int32 or bool. Export runs the
        module on them (and on copies with a grown batch and grown
        dynamic_dims) to learn which sizes are free; token ids must be valid.
      path: destination file; written atomically (path + ".tmp", renamed).
      example_kwargs: dict of forward's keyword arguments, tensors as above.
      split_spec: {module FQN: SplitPoint}, cuts at module boundaries.
      replicated: names of inputs that are passed whole to every microbatch;
        all other inputs are split along dim 0 (the batch: any size).
      dynamic_dims: {input name: [dims]}: dimensions besides the batch that
        may take any size at run time (a sequence length: {"ids": [1]}).
        Sizes computed from them (x.size(1), views, masks sliced to the
        length) are traced as run-time integers.
      generation: export a causal language model for generation (token ids
        [batch, seq] in, logits of every position out): every recognised
        attention reads and extends a per-stage KV cache, and positions
        follow each sequence's offset (see generation.py). The sequence
        dim is dynamic without asking. A model that cannot be made
        cache-aware raises ExportError naming the node and why.
      logits: with generation, the output holding the logits (default:
        the first).

    Returns:
      ExportInfo.

    Raises:
      ExportError: unsupported op, module, input, parameter dtype, output, or
        split (unknown module, or a cut that leaves a stage empty).
    """
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"export needs a torch.nn.Module, got "
                          f"{type(module).__name__}")
    example_args = tuple(example_args)
    example_kwargs = dict(example_kwargs or {})
    split_spec = dict(split_spec or {})
    replicated = ((replicated,) if isinstance(replicated, str)
                  else tuple(replicated))

    dynamic_dims = {k: list(v) for k, v in (dynamic_dims or {}).items()}
    inputs = _bind_inputs(module, example_args, example_kwargs)
    names = [name for name, _, _ in inputs]
    if generation and len(names) == 1 and names[0] not in dynamic_dims:
        dynamic_dims[names[0]] = [1]
    unknown = (set(replicated) | set(dynamic_dims)) - set(names)
    if unknown:
        raise ExportError(f"replicated/dynamic_dims name unknown inputs "
                          f"{sorted(unknown)}; inputs are {names}")
    examples, free = _examples(inputs, replicated, dynamic_dims)
    probe_inputs = _row_probes(inputs, examples, replicated)
    state = _StateTensors(module)
    for key, t in module.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor):
            _proto_dtype(t.dtype, f"parameter '{key}'")
    tracer = _Tracer(state, inputs, examples)
    fx_graph = tracer.trace_module(module)

    converter = _Converter(module, tracer, state)
    converter.probe_outputs = [_run_eagerly(module, p) for p in probe_inputs]
    for name, _, value in inputs:
        converter.add_input(name, value, batched=name not in replicated,
                            free_dims=free[name])
    graph = converter.convert(fx_graph)
    if generation:
        _make_cache_aware(graph, converter, names[0], logits)
    num_stages = _count_stages(graph, split_spec, module)
    for fqn, point in split_spec.items():
        graph.split_spec.add(module=fqn, point=int(point))
    graph.state_dict_keys.extend(state.state_dict_keys)
    model_file.write_model(path, graph, _add_params(graph, converter.stored, state.aliases))

    return ExportInfo(num_stages=num_stages,
                      param_names=list(state.state_dict_keys),
                      input_names=[v.name for v in graph.inputs],
                      output_names=list(graph.outputs),
                      path=path)


def _examples(inputs, replicated, dynamic_dims):
    """Each input's examples (as given, with a grown batch, with grown
    dynamic dims) and its free dims (checked, non-negative), by name."""
    examples, free = {}, {}
    for name, _, value in inputs:
        batched = name not in replicated
        dims = []
        for d in dynamic_dims.get(name, []):
            if not -value.dim() <= d < value.dim() or (batched and d % value.dim() == 0):
                raise ExportError(f"dynamic_dims['{name}']: {d} is not a "
                                  f"non-batch dimension of {tuple(value.shape)}")
            dims.append(d % value.dim())
        free[name] = dims
        grown_batch = _grow(value, 0) if batched and value.dim() else value
        grown_free = value
        for d in dims:
            grown_free = _grow(grown_free, d)
        # Copies, one a variant: an in-place op (x += 1) runs on each
        # variant's own tensor, never on the caller's.
        examples[name] = [value.clone(), grown_batch.clone(), grown_free.clone()]
    return examples, free


def _row_probes(inputs, examples, replicated):
    """_row_probe_inputs with floats moved up, and down where there are
    floats to move."""
    floats = any(examples[name][1].is_floating_point() for name, _, _ in inputs
                 if name not in replicated)
    return [_row_probe_inputs(inputs, examples, replicated, s) for s in ((1, -1) if floats else (1,))]


def _row_probe_inputs(inputs, examples, replicated, sign):
    """Variant 1's inputs with batch row 0 changed (_changed_row0, floats
    moved by `sign`), as [(name, is keyword, tensor)]; None when no input
    changes. Outputs on these keep rows 1.. of variant 1's wherever rows do
    not mix: a duplicated row 0 alone hides reductions over the batch
    (amax(0)). Both signs are probed: a max over rows that one move leaves
    alone (the features it lowers), the other raises."""
    probe, changed = [], False
    for name, is_kw, _ in inputs:
        x = examples[name][1].clone()  # before tracing: an in-place op writes variants
        if name not in replicated and x.dim():
            y = _changed_row0(x, sign)
            changed = changed or not torch.equal(y, x)
            x = y
        probe.append((name, is_kw, x))
    return probe if changed else None


def _changed_row0(x, sign=1):
    """x with row 0 changed: floats moved past every other row's values,
    up and down in turn along the last dim (so maxima and minima over rows
    change); bools flipped; integers (ids, each column maybe of its own
    table) given a value no row has in that column and within what a
    zero-based table there holds: the middle of a gap in the column's
    range, else one below its least; else another row's."""
    y = x.clone()
    if x.is_floating_point():
        delta = 1 + 2 * float(x.abs().max()) if x.numel() else 1.0
        turns = torch.full((x.shape[-1] if x.dim() > 1 else 1,), float(sign),
                           dtype=torch.float64, device=x.device)
        turns[1::2] = -sign
        y[0] = (x[0].double() + delta * turns).to(x.dtype)
        return y
    if x.dtype == torch.bool:
        y[0] = ~x[0]
        return y
    lo, hi = x.amin(0), x.amax(0)
    mid = lo + (hi - lo) // 2
    gap = (hi - lo >= 2) & ~(x == mid).any(0)
    y[0] = torch.where(gap, mid, torch.where(lo > 0, lo - 1, x[0]))
    if not torch.equal(y[0], x[0]):
        return y
    for r in range(1, x.shape[0]):
        if not torch.equal(x[r], x[0]):
            y[0] = x[r]
            break
    return y


def _run_eagerly(module, probe):
    """module's outputs on `probe` (_row_probe_inputs), as a list; None
    for no probe, or when the module refuses the changed row (a float used
    as an index, an assert), with a warning."""
    if probe is None:
        return None
    args = [x for _, is_kw, x in probe if not is_kw]
    kwargs = {name: x for name, is_kw, x in probe if is_kw}
    try:
        with torch.no_grad():
            out = module(*args, **kwargs)
    except Exception as e:  # the user's forward: anything it raises
        warnings.warn(f"pipeserve.export: the model failed on the examples with batch row 0 "
                      f"changed ({type(e).__name__}: {e}); whether outputs mix batch rows is "
                      "checked on the examples alone")
        return None
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _make_cache_aware(graph, converter, ids, logits):
    """Rewrites graph for generation (generation.py), keeping only the
    stored tensors it still reads."""
    try:
        shapes = dict(converter.shapes)
        shapes.update((t.fqn, tuple(t.tensor.shape)) for t in converter.stored)
        used = _generation.make_cache_aware(graph, shapes, ids, logits=logits)
    except _generation.GenerationError as e:
        raise ExportError(str(e)) from None
    converter.stored = [t for t in converter.stored if t.fqn in used]


def _add_params(graph, stored, aliases):
    """Adds the stored tensors to graph's params, and the aliases of those
    among them; returns their arrays, in order."""
    fqns = {t.fqn for t in stored}
    for alias, canonical in aliases.items():
        # Aliases of tensors the graph never reads are left out: the proto
        # promises every alias target is a key of `params`.
        if canonical in fqns:
            graph.aliases[alias] = canonical
    arrays = []
    for t in stored:
        graph.params.add(fqn=t.fqn,
                         dtype=_proto_dtype(t.tensor.dtype, f"parameter '{t.fqn}'"),
                         shape=list(t.tensor.shape), is_buffer=t.is_buffer,
                         in_state_dict=t.in_state_dict)
        arrays.append(_numpy_of(t.tensor))
    return arrays


def _bind_inputs(module, example_args, example_kwargs):
    """[(argument name, is keyword, example tensor)] in forward's order."""
    forward = type(module).forward
    sig = inspect.signature(forward)
    try:
        bound = sig.bind(module, *example_args, **example_kwargs)
    except TypeError as e:
        raise ExportError(f"example inputs do not match "
                          f"{type(module).__name__}.forward{sig}: {e}") from e
    inputs = []
    for i, (name, value) in enumerate(list(bound.arguments.items())[1:]):
        kind = sig.parameters[name].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL,
                    inspect.Parameter.VAR_KEYWORD):
            raise ExportError(f"input '{name}': forward's *args/**kwargs "
                              "inputs are not supported")
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"input '{name}': only tensors are supported, "
                              f"got {type(value).__name__}")
        _proto_dtype(value.dtype, f"input '{name}'")
        inputs.append((name, i >= len(example_args), value))
    return inputs


@dataclasses.dataclass
class _Tensor:
    fqn: str  # canonical FQN
    tensor: torch.Tensor
    is_buffer: bool
    in_state_dict: bool


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else name


class _StateTensors:
    """Every parameter and buffer of a module, looked up by tensor identity.

    One tensor reachable under several names (`self.b = self.a = Parameter`)
    has one canonical FQN: its first state_dict key. The others are aliases.
    """

    def __init__(self, module):
        self.state_dict_keys = []
        self.aliases = {}  # alias key -> canonical key
        self._by_id = {}  # id(tensor) -> _Tensor
        for key, t in module.state_dict(keep_vars=True).items():
            self.state_dict_keys.append(key)
            if not isinstance(t, torch.Tensor):
                continue  # a module's extra state
            entry = self._by_id.get(id(t))
            if entry is None:
                self._by_id[id(t)] = _Tensor(
                    key, t, not isinstance(t, torch.nn.Parameter), True)
            else:
                self.aliases[key] = entry.fqn
        # Tensors outside the state_dict (non-persistent buffers) are named by
        # their first path in the module tree.
        for mod_path, mod in module.named_modules(remove_duplicate=False):
            for is_buffer, table in ((True, mod._buffers),
                                     (False, mod._parameters)):
                for name, t in table.items():
                    if t is not None and id(t) not in self._by_id:
                        self._by_id[id(t)] = _Tensor(_join(mod_path, name), t,
                                                     is_buffer, False)

    def lookup(self, tensor):
        """The tensor's _Tensor, or None if it is no parameter or buffer."""
        return self._by_id.get(id(tensor))


_REQUIRED = object()

# Examples: every traced value carries three concrete values, computed by
# running each op eagerly as it is traced. Variant 0 is the user's example;
# variant 1 grows the batch dimension of every batched input by one row;
# variant 2 grows every other free dimension (export's dynamic_dims) by one.
# A dimension that differs between the variants is free (-1 in the graph);
# one that differs between variants 0 and 1 is the batch. `x.size(d)` of a
# fixed dimension is a Python int while tracing (so `math.sqrt(x.size(-1))`
# works); of a free one it is a traced int ("size" node).
_VARIANTS = 3


def _grow(t, dim):
    """`t` with one more entry along `dim` (a copy of its first)."""
    return torch.cat([t, t.narrow(dim, 0, 1)], dim)


class _ExProxy(torch.fx.Proxy):
    """A proxy whose sizes, dtype and device are read from its examples."""

    def _ex(self):
        return self.node.meta["ex"]

    # x += y is in place: traced as operator.iadd (Python would fall back
    # to x + y and lose the write through other names of x), and converted
    # as the out-of-place op only where nothing reads x again.
    def _inplace(self, op, other):
        if not isinstance(self._ex()[0], torch.Tensor):  # an int: x += 1 makes a new one
            return {operator.iadd: operator.add, operator.isub: operator.sub,
                    operator.imul: operator.mul, operator.itruediv: operator.truediv}[op](self, other)
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    def __iadd__(self, other):
        return self._inplace(operator.iadd, other)

    def __isub__(self, other):
        return self._inplace(operator.isub, other)

    def __imul__(self, other):
        return self._inplace(operator.imul, other)

    def __itruediv__(self, other):
        return self._inplace(operator.itruediv, other)

    def size(self, dim=None):
        return self.tracer.traced_size(self, dim)

    @property
    def shape(self):
        return self.tracer.traced_size(self, None)

    def dim(self):
        return self._ex()[0].dim()

    @property
    def ndim(self):
        return self._ex()[0].dim()

    @property
    def dtype(self):
        return self._ex()[0].dtype

    @property
    def device(self):
        return self._ex()[0].device

    @property
    def is_cuda(self):
        return False

    def __getattr__(self, k):
        # Plain attributes of the example (is_nested, requires_grad, layout,
        # ...) are read from it; methods and tensors are traced.
        ex = self.node.meta["ex"][0] if "ex" in self.node.meta else None
        if isinstance(ex, torch.Tensor) and not k.startswith("__"):
            v = getattr(ex, k, None)
            if v is not None and not callable(v) and not isinstance(v, torch.Tensor):
                return v
        return super().__getattr__(k)

    def __len__(self):
        ex = self._ex()[0]
        if isinstance(ex, (tuple, list)):
            return len(ex)
        if isinstance(ex, torch.Tensor) and ex.dim() > 0:
            size = self.tracer.traced_size(self, 0)
            if isinstance(size, int):
                return size
        raise ExportError(f"len() of a traced value whose length is only known "
                          f"at run time ('{self.node.name}')")

    def __iter__(self):
        ex = self._ex()[0]
        if isinstance(ex, (tuple, list)):
            return iter([self[i] for i in range(len(ex))])
        return iter([self[i] for i in range(len(self))])

    def __bool__(self):
        # Control flow on sizes that agree in every variant (`if T >
        # block_size`) is decided while tracing; on tensors it is not.
        ex = self._ex()
        if all(isinstance(e, (bool, int)) for e in ex) and len(set(map(bool, ex))) == 1:
            if _reads_run_time_size(self.node):
                warnings.warn(
                    f"control flow on a size known only at run time ('{self.node.name}') is "
                    f"decided as in the examples ({bool(ex[0])}): a request for which it "
                    "goes the other way runs this branch all the same", stacklevel=2)
            return bool(ex[0])
        raise ExportError(f"control flow depends on a traced value "
                          f"('{self.node.name}'), which only the run knows")

    def __index__(self):
        raise ExportError(f"a size known only at run time ('{self.node.name}') "
                          "is used as a Python int (range(), list index, ...)")


def _storage_of(node):
    """Where a traced value's example (variant 0) keeps its data, or None
    for no tensor (or an empty one, whose pointer says nothing)."""
    ex = node.meta.get("ex", [None])[0] if isinstance(node, torch.fx.Node) else None
    if not isinstance(ex, torch.Tensor) or ex.numel() == 0:
        return None
    return ex.storage().data_ptr()


def _reads_data(user):
    """Whether a node reads its input's values (not just its size)."""
    name = getattr(user.target, "__name__", str(user.target))
    if name in ("size", "dim"):
        return False
    return not (name == "getattr" and len(user.args) > 1 and
                user.args[1] in ("shape", "dtype", "device", "ndim"))


def _reads_run_time_size(node):
    """Whether a traced value's node reads one that differs between the
    examples (a free size), so the value is decided for the examples only."""
    seen = []
    torch.fx.node.map_arg((node.args, node.kwargs), seen.append)
    for n in seen:
        ex = n.meta.get("ex")
        if ex and all(isinstance(e, (bool, int)) for e in ex) and len(set(ex)) > 1:
            return True
    return False


# Module.__getattr__ and __call__ as they are outside tracing: FX patches
# both while it traces, and example values are computed eagerly then.
_MODULE_GETATTR = torch.nn.Module.__getattr__
_MODULE_CALL = torch.nn.Module.__call__


_TORCH_FULL = torch.full  # before tracing patches it
_SCALAR_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64,
                  torch.int32, torch.bool)


class _Untraced:
    """Eager PyTorch inside a trace: FX's module patches undone for a while."""

    def __enter__(self):
        global _ACTIVE_TRACER
        self._saved = (torch.nn.Module.__getattr__, torch.nn.Module.__call__,
                       _ACTIVE_TRACER)
        torch.nn.Module.__getattr__ = _MODULE_GETATTR
        torch.nn.Module.__call__ = _MODULE_CALL
        _ACTIVE_TRACER = None  # pipe_split() does nothing
        return self

    def __exit__(self, *exc):
        global _ACTIVE_TRACER
        (torch.nn.Module.__getattr__, torch.nn.Module.__call__,
         _ACTIVE_TRACER) = self._saved
        return False


class _SizeArgumentsTraced:
    """While tracing, torch.arange(T), torch.zeros(B, T), ... with a traced
    int T become call_function nodes (torch's argument parser does not let
    a proxy stand for a number, so FX alone cannot record them)."""

    FUNCTIONS = ("arange", "zeros", "ones", "full")

    def __init__(self, tracer):
        self._tracer = tracer
        self._saved = {}

    def __enter__(self):
        tracer = self._tracer
        for name in self.FUNCTIONS:
            original = getattr(torch, name)
            self._saved[name] = original

            def wrapper(*args, _original=original, **kwargs):
                # Recorded whenever forward calls it (examples run eagerly).
                if _ACTIVE_TRACER is tracer:
                    return tracer.create_proxy("call_function", _original,
                                               args, kwargs)
                return _original(*args, **kwargs)
            setattr(torch, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch, name, original)
        return False


class _Tracer(torch.fx.Tracer):
    """A torch.fx tracer that records the module path of every node and
    runs every op on example values as it traces (see _VARIANTS).

    It keeps its own stack of the modules whose forward is running (FX's
    node meta does not say which alias a module was called under), makes
    placeholders only for the inputs export was given, and turns buffer reads
    into get_attr nodes.
    """

    proxy_buffer_attributes = True

    def __init__(self, state, inputs, examples):
        super().__init__()
        self._state = state
        self._inputs = inputs
        self._examples = examples  # input name -> [variant tensors]
        # (path, module) of every module whose forward is running.
        self._stack = [("", None)]
        self._last_module_attr = None  # (attribute name, module) last read
        self.module_path_of = {}  # torch.fx.Node -> module path
        self.error_path = None  # innermost module path of a failure
        self._running_examples = False

    def current_path(self):
        return self._stack[-1][0]

    def trace_module(self, root):
        """Traces root.forward; failures become ExportError with a path."""
        global _ACTIVE_TRACER
        if _ACTIVE_TRACER is not None:
            raise ExportError("export called while another export is tracing")
        self._stack = [("", root)]
        _ACTIVE_TRACER = self
        try:
            with torch.no_grad(), _SizeArgumentsTraced(self):
                return self.trace(root)
        except ExportError:
            raise
        except Exception as e:
            path = self.error_path if self.error_path is not None else ""
            raise ExportError(f"tracing failed at module path '{path}': "
                              f"{type(e).__name__}: {e}") from e
        finally:
            _ACTIVE_TRACER = None

    def proxy(self, node):
        return _ExProxy(node, self)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        # One placeholder per given input; forward is called the way the
        # example inputs were passed, so parameters left out keep defaults.
        proxies = [self.create_proxy("placeholder", name, (), {})
                   for name, _, _ in self._inputs]
        keywords = [is_kw for _, is_kw, _ in self._inputs]
        names = [name for name, _, _ in self._inputs]
        root = self.root

        def call_forward(*values):
            args = [v for v, kw in zip(values, keywords) if not kw]
            kwargs = {n: v for n, v, kw in zip(names, values, keywords) if kw}
            return root_fn(root, *args, **kwargs)

        return call_forward, proxies

    def create_node(self, kind, target, args, kwargs, name=None,
                    type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        self.module_path_of[node] = self.current_path()
        return node

    def create_proxy(self, kind, target, args, kwargs, name=None,
                     type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name,
                                     type_expr, proxy_factory_fn)
        node = proxy.node
        if kind == "placeholder":
            node.meta["ex"] = list(self._examples[target])
        elif kind == "get_attr":
            with _Untraced():
                obj = self.root
                for atom in target.split("."):
                    obj = getattr(obj, atom)
            node.meta["ex"] = [obj] * _VARIANTS
        elif target is pipe_split:
            node.meta["ex"] = [None] * _VARIANTS
        else:
            node.meta["ex"] = [self._run_example(node, i)
                               for i in range(_VARIANTS)]
        return proxy

    def _run_example(self, node, i):
        def value(n):
            return n.meta["ex"][i]
        args = torch.fx.node.map_arg(node.args, value)
        kwargs = torch.fx.node.map_arg(node.kwargs, value)
        with _Untraced():
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return self.root.get_submodule(node.target)(*args, **kwargs)

    def traced_size(self, proxy, dim):
        """x.size(dim): an int for a fixed dimension, else a traced int."""
        ex = proxy.node.meta["ex"]
        rank = ex[0].dim()
        if dim is None:
            return tuple(self.traced_size(proxy, d) for d in range(rank))
        d = dim + rank if dim < 0 else dim
        sizes = {e.shape[d] for e in ex}
        if len(sizes) == 1:
            return ex[0].shape[d]
        return self.create_proxy("call_method", "size", (proxy, d), {})

    # torch.nn modules FX would keep whole: traced through, so their
    # parameters keep PyTorch's FQNs and F.multi_head_attention_forward is
    # converted by _ops.py.
    TRACED_THROUGH = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer,
                      torch.nn.TransformerEncoder, torch.nn.TransformerDecoderLayer,
                      torch.nn.TransformerDecoder)

    def is_leaf_module(self, m, module_qualified_name):
        if isinstance(m, self.TRACED_THROUGH):
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if isinstance(attr_val, torch.nn.Module):
            self._last_module_attr = (attr, attr_val)
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a):
        # FX would stash an unknown tensor on the root module as
        # "_tensor_constant0"; pipeserve stores only parameters and buffers.
        if (isinstance(a, torch.Tensor) and
                not isinstance(a, torch.nn.Parameter) and
                self._state.lookup(a) is None):
            if a.dim() == 0 and a.dtype in _SCALAR_DTYPES and self.tensor_attrs.get(a) is None:
                # A scalar made inside forward, as Hugging Face code does
                # (torch.tensor(torch.finfo(dtype).min), torch.full([], v)):
                # a "full" node of its value and dtype.
                return self.create_proxy("call_function", _TORCH_FULL,
                                         ((), a.item()), {"dtype": a.dtype}).node
            attr = self.tensor_attrs.get(a)
            what = (f"tensor attribute '{attr}' (not a parameter or buffer; "
                    "use register_buffer)" if attr else
                    "tensor constant made during tracing")
            raise ExportError(f"unsupported {what} at module path "
                              f"'{self.current_path()}'")
        return super().create_arg(a)

    def call_module(self, m, forward, args, kwargs):
        path = self._path_of_call(m)
        self._stack.append((path, m))
        try:
            if self.is_leaf_module(m, path):
                return self.create_proxy("call_module", path, args, kwargs)
            return forward(*args, **kwargs)
        except Exception:
            if self.error_path is None:
                self.error_path = path
            raise
        finally:
            self._stack.pop()

    def _path_of_call(self, m):
        # `self.lin0(x)` reads attribute "lin0" of the running module just
        # before the call: that names the alias used. Calls without such a
        # read (Sequential, ModuleList loops) get the module's first FQN.
        last, self._last_module_attr = self._last_module_attr, None
        parent_path, parent = self._stack[-1]
        if (last is not None and last[1] is m and parent is not None and
                parent._modules.get(last[0]) is m):
            return _join(parent_path, last[0])
        return self.path_of_module(m)


_TORCH_DTYPES = {
    torch.float32: model_pb2.DT_FLOAT32,
    torch.float16: model_pb2.DT_FLOAT16,
    torch.bfloat16: model_pb2.DT_BFLOAT16,
    torch.int64: model_pb2.DT_INT64,
    torch.int32: model_pb2.DT_INT32,
    torch.bool: model_pb2.DT_BOOL,
}


def _proto_dtype(dtype, what):
    try:
        return _TORCH_DTYPES[dtype]
    except KeyError:
        raise ExportError(f"{what} has dtype {dtype}; supported: float32, "
                          "float16, bfloat16, int64, int32, bool") from None


def _numpy_of(tensor):
    """The tensor's bytes as a numpy array (bfloat16 as uint16 bits)."""
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view("<u2")
    return t.numpy()


def _function_name(fn):
    """torch.sigmoid, torch.nn.functional.gelu, operator.truediv, ..."""
    name = getattr(fn, "__name__", repr(fn))
    for prefix, namespace in (("torch", torch), ("torch.nn.functional", F),
                              ("operator", operator)):
        if getattr(namespace, name, None) is fn:
            return f"{prefix}.{name}"
    if fn is pipe_split:
        return "pipeserve.pipe_split"
    return f"{getattr(fn, '__module__', None) or '?'}.{name}"


def _module_type_name(m):
    """torch.nn.Conv2d, or module.Class for types outside torch.nn."""
    cls = type(m)
    if getattr(torch.nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


from ._ops import OpConverter  # noqa: E402  (needs the names above)


class _Converter(OpConverter):
    """Turns a traced torch.fx graph into a model_pb2.Graph."""

    def __init__(self, root, tracer, state):
        self._root = root
        self._tracer = tracer
        self._state = state
        self._graph = model_pb2.Graph()
        self._names = set()  # value and node names in use
        self._value = {}  # torch.fx.Node -> value name
        self._attr = {}  # get_attr torch.fx.Node -> tensor
        self._param_value = {}  # canonical FQN -> value name
        self._position = {}  # torch.fx.Node -> index in the trace
        self._dtype = {}  # value name -> torch dtype
        self._virtual = {}  # split/chunk node -> [(value, dim, start, stop)]
        self._tuples = {}  # node returning a tuple -> [value name or None]
        self._poisoned = {}  # node -> why it cannot be used
        self.stored = []  # _Tensor of every param node, in emission order
        self.shapes = {}  # value name -> shape in the first example

    def add_input(self, name, example, batched, free_dims):
        shape = list(example.shape)
        if batched:
            if not shape:
                raise ExportError(f"input '{name}' is a scalar tensor; list it "
                                  "in replicated or give it a batch dim")
            shape[0] = -1
        for d in free_dims:
            shape[d] = -1
        self._graph.inputs.add(
            name=name, dtype=_proto_dtype(example.dtype, f"input '{name}'"),
            shape=shape, batched=batched)
        self._names.add(name)
        self._dtype[name] = example.dtype
        self.shapes[name] = tuple(example.shape)

    def convert(self, fx_graph):
        nodes = list(fx_graph.nodes)
        self._position = {n: i for i, n in enumerate(nodes)}
        # FX names are unique; reserve those that become graph names so that
        # param and identity nodes added here cannot take them.
        self._names.update(n.name for n in nodes
                           if n.op.startswith("call_"))
        placeholders = iter(self._graph.inputs)
        for node in nodes:
            if node.op == "placeholder":
                self._value[node] = next(placeholders).name
            elif node.op == "get_attr":
                self._attr[node] = self._resolve_attr(node)
            elif node.op == "output":
                self._convert_output(node)
            else:
                self._convert_call(node)
        return self._graph

    # Values and names.

    def _fresh(self, base):
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def _resolve_attr(self, node):
        obj = self._root
        for atom in node.target.split("."):
            obj = getattr(obj, atom)
        path = self._tracer.module_path_of[node]
        if not isinstance(obj, torch.Tensor):
            raise ExportError(f"unsupported attribute '{node.target}' "
                              f"({type(obj).__name__}) used as a value at "
                              f"module path '{path}'")
        return obj

    def _param(self, tensor, module_path):
        """The value name of a parameter or buffer; emits its param node the
        first time it is read."""
        entry = self._state.lookup(tensor)
        if entry is None:
            raise ExportError(f"a tensor read at module path '{module_path}' "
                              "is not a parameter or buffer of the module")
        name = self._param_value.get(entry.fqn)
        if name is None:
            _proto_dtype(entry.tensor.dtype, f"parameter '{entry.fqn}'")
            name = self._fresh(entry.fqn)
            node = self._graph.nodes.add(name=name, op="param", outputs=[name],
                                         module_path=module_path)
            node.attrs["fqn"].s = entry.fqn
            self._param_value[entry.fqn] = name
            self._dtype[name] = entry.tensor.dtype
            self.stored.append(entry)
        return name

    def _use(self, arg, module_path):
        """The value name of a tensor argument (an FX node)."""
        if arg in self._attr:
            return self._param(self._attr[arg], module_path)
        if arg in self._poisoned:
            raise ExportError(self._poisoned[arg])
        if arg in self._virtual or arg in self._tuples:
            raise ExportError(f"the result of '{arg.name}' (a tuple) is used "
                              "whole; only its items can be used")
        return self._value[arg]

    # Nodes.

    def _convert_call(self, node):
        path = self._tracer.module_path_of[node]
        if (not node.users and node.target is not pipe_split and
                not isinstance(node.meta["ex"][0], torch.Tensor)):
            return  # a check whose answer tracing already took (a fast-path test)
        if node.op == "call_module":
            self._convert_module(node, path)
            return
        if node.op == "call_function":
            handler = self.FUNCTIONS.get(node.target)
            display = _function_name(node.target)
        else:  # call_method
            handler = self.METHODS.get(node.target)
            display = f"Tensor.{node.target}"
        if handler is None:
            raise ExportError(f"unsupported op {display} at module path "
                              f"'{path}'")
        handler(self, node, display, path)

    def _convert_module(self, node, path):
        m = self._root.get_submodule(node.target)
        display = _module_type_name(m)
        handler = None
        for cls, h in self.MODULES:
            if isinstance(m, cls):
                handler = h
                break
        if handler is None:
            raise ExportError(f"unsupported module {display} at '{path}'")
        handler(self, node, m, display, path)

    def _bind(self, node, params, display, path):
        """Matches node.args/kwargs to params: {name: value} in params order."""
        args, kwargs = list(node.args), dict(node.kwargs)
        if len(args) > len(params):
            raise ExportError(f"{display} at module path '{path}': takes "
                              f"{len(params)} arguments, got {len(args)}")
        bound = {}
        for i, (name, default) in enumerate(params):
            if i < len(args):
                bound[name] = args[i]
            elif name in kwargs:
                bound[name] = kwargs.pop(name)
            elif default is _REQUIRED:
                raise ExportError(f"{display} at module path '{path}': "
                                  f"missing argument '{name}'")
            else:
                bound[name] = default
        if kwargs:
            raise ExportError(f"unsupported argument(s) {sorted(kwargs)} of "
                              f"{display} at module path '{path}'")
        return bound

    def _check_inplace(self, node, x, display, path):
        # An in-place op is the same dataflow as the out-of-place one unless
        # it overwrites a parameter, or a value sharing x's storage (x, its
        # views, what it views, as the examples share it) is read afterwards.
        if not isinstance(x, torch.fx.Node):
            return
        at = self._position[node]
        for v in self._aliases(x, at):
            if v.op == "get_attr" or any(self._position[u] > at and _reads_data(u)
                                         for u in v.users):
                raise ExportError(f"unsupported in-place {display} at module path "
                                  f"'{path}': it overwrites a value that is read "
                                  "again (or a parameter); use the out-of-place "
                                  "form")

    def _aliases(self, x, before):
        """x and the values traced before position `before` sharing its
        storage (values made after the write read what it wrote)."""
        ptr = _storage_of(x)
        if ptr is None:
            return [x]
        return [n for n, i in self._position.items()
                if n is x or (i < before and _storage_of(n) == ptr)]

    def _convert_output(self, node):
        result = node.args[0]
        values = list(result) if isinstance(result, (tuple, list)) else [result]
        identity_of = {}  # input value -> its identity node's output
        low_precision = any(
            isinstance(n.meta.get("ex", [None])[0], torch.Tensor) and
            n.meta["ex"][0].dtype in (torch.float16, torch.bfloat16) for n in self._position)
        probes = [p for p in getattr(self, "probe_outputs", []) if p is not None]
        for i, v in enumerate(values):
            if not isinstance(v, torch.fx.Node):
                raise ExportError(f"forward returns a {type(v).__name__}; only "
                                  "a tensor or a tuple/list of tensors can be "
                                  "exported")
            if not isinstance(v.meta["ex"][0], torch.Tensor):
                raise ExportError(f"forward returns '{v.name}', a "
                                  f"{type(v.meta['ex'][0]).__name__}; only "
                                  "tensors can be model outputs")
            _check_rows(v, low_precision,
                        [p[i] for p in probes if i < len(p)])
            name = self._use(v, "")
            if v.op == "placeholder":
                # Every output must be made by a node, even an input returned
                # as is.
                if name not in identity_of:
                    out = self._fresh(f"{name}_identity")
                    self._graph.nodes.add(name=out, op="identity",
                                          inputs=[name], outputs=[out])
                    identity_of[name] = out
                name = identity_of[name]
            self._graph.outputs.append(name)


def _close(a, b, low_precision):
    """Whether two examples of a value agree, to within what computing a
    row in a batch of another size may change (GEMMs block differently):
    in a model with 16-bit values anywhere, a 16-bit rounding; integers and
    bools made from floats may flip at a boundary, 1 in 100 of them."""
    if a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return a.numel() == 0 or float((a != b).float().mean()) <= 0.01
    tol = 3e-2 if low_precision or a.dtype in (torch.float16, torch.bfloat16) else 1e-4
    a, b = a.double(), b.double()
    finite = a[torch.isfinite(a)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    return torch.allclose(a, b, rtol=tol, atol=tol * 0.1 * scale, equal_nan=True)


def _check_rows(node, low_precision, probes=()):
    """Refuses an output the server would answer wrong. It splits a request
    into microbatches by rows of dim 0 (the batch) and merges requests the
    same way, so a batched output's row i must come from input row i alone,
    one row each, and an output without the batch dim from no row. Variant
    1 of the examples has one more batch row, a copy of row 0 (_grow);
    `probes` are outputs on variant 1 with row 0 changed (_row_probe_inputs)."""
    probes = [p for p in probes if isinstance(p, torch.Tensor)]
    e0, e1 = node.meta["ex"][0], node.meta["ex"][1]
    where = f"output '{node.name}'"
    if e0.shape == e1.shape:
        if not _close(e0, e1, low_precision) or any(
                not _close(p, e1, low_precision) for p in probes):
            raise ExportError(
                f"{where} has no batch dimension but depends on the batch rows (a reduction "
                "or transpose over dim 0?): the server splits and merges requests by rows of "
                "dim 0, so it would answer each microbatch's; keep dim 0 the batch")
        return
    rows = e0.shape[0] if e0.dim() else 0
    if e0.dim() == 0 or e1.shape[0] != rows + 1 or e1.shape[1:] != e0.shape[1:]:
        raise ExportError(
            f"{where} is {tuple(e0.shape)} for the example's batch and {tuple(e1.shape)} for "
            "one row more: the server needs one output row per input row along dim 0 (keep "
            "the batch dimension first, e.g. reshape to (B, -1, D); with an example batch of "
            "1, squeeze() drops it: give 2 rows or squeeze(dim))")
    probe_mixes = any(not (p.shape == e1.shape and _close(p[1:], e1[1:], low_precision))
                      for p in probes)
    if probe_mixes or not (_close(e1[:rows], e0, low_precision) and
                           _close(e1[rows:], e0[:1], low_precision)):
        raise ExportError(
            f"{where} mixes rows of the batch (dim 0): its row i must come from input row i "
            "alone, as the server splits and merges requests by rows (batch_first=False? "
            "put the batch first)")


def _count_stages(graph, split_spec, root):
    """1 + the number of distinct cut positions, checking every cut.

    A cut position is the number of compute nodes (neither "param" nor
    "pipe_split") before the cut. A pipe_split node cuts where it stands;
    split_spec cuts just before the first (BEGINNING) or just after the last
    (END) compute node whose module_path is the module or under it.
    """
    compute = [n for n in graph.nodes if n.op not in ("param", "pipe_split")]
    cuts = {}  # position -> description of the first cut there
    position = 0
    for n in graph.nodes:
        if n.op == "pipe_split":
            cuts.setdefault(position, f"pipe_split node '{n.name}' (module path "
                            f"'{n.module_path}')")
        elif n.op != "param":
            position += 1

    modules = {name for name, _ in root.named_modules(remove_duplicate=False)}
    for fqn, point in split_spec.items():
        if fqn not in modules:
            raise ExportError(f"split_spec names unknown module '{fqn}'")
        try:
            point = SplitPoint(point)
        except ValueError:
            raise ExportError(f"split_spec['{fqn}'] = {point!r} is not a "
                              "SplitPoint") from None
        inside = [i for i, n in enumerate(compute)
                  if fqn == "" or n.module_path == fqn or
                  n.module_path.startswith(fqn + ".")]
        if not inside:
            raise ExportError(f"split_spec module '{fqn}' runs no ops in "
                              "forward")
        at = inside[0] if point == SplitPoint.BEGINNING else inside[-1] + 1
        cuts.setdefault(at, f"{point.name} of module '{fqn}'")

    for at, what in cuts.items():
        if at == 0 or at == len(compute):
            raise ExportError(f"split at {what} makes an empty stage")
    return 1 + len(cuts)
