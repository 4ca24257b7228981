"""How each traced PyTorch call becomes pipeserve ops (exporter.py's half
that knows torch's API). The ops and their attributes are listed in
graph/op_schema.cc, which checks them.

Every handler reads the call's arguments (FX nodes, Python numbers, sizes
that are Python ints or traced ints) and the examples of its result
(node.meta["ex"]: the result's dtype and which of its sizes are free), and
emits one or more nodes. The last node takes the FX node's name; operands
whose dtype differs from what PyTorch computes in are cast first, so every
op in the graph sees inputs of one dtype.
"""

import math
import operator

import torch
import torch.fx
import torch.nn.functional as F

from . import exporter as _ex


def _is_number(x):
    return _ex._is_number(x)


def _is_sym(x):
    """A traced int: the run-time value of a size."""
    return (isinstance(x, torch.fx.Node) and
            isinstance(x.meta["ex"][0], int) and
            not isinstance(x.meta["ex"][0], bool))


def _result(node):
    return node.meta["ex"][0]


def _result_dtype(node):
    r = _result(node)
    if isinstance(r, torch.Tensor):
        return r.dtype
    if isinstance(r, bool):
        return torch.bool
    if isinstance(r, int):
        return torch.int64
    raise _ex.ExportError(f"'{node.name}' computes a {type(r).__name__} at run "
                          "time; only tensors and integer sizes are supported")


def _free(node, dim):
    sizes = {e.shape[dim] for e in node.meta["ex"]}
    return len(sizes) > 1


def _arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _varargs(node, start):
    """f(x, 2, 3) or f(x, (2, 3)): the items from args[start] on."""
    rest = list(node.args[start:])
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        return list(rest[0])
    return rest


class OpConverter:
    """Mixin of exporter._Converter: the op handlers and their tables."""

    # ---- emitting -------------------------------------------------------

    def _emit(self, op, inputs, attrs=None, fx=None, path="", dtype=None,
              base=None):
        name = fx.name if fx is not None else self._fresh(base or op)
        n = self._graph.nodes.add(name=name, op=op, inputs=list(inputs),
                                  outputs=[name], module_path=path)
        for key, value in (attrs or {}).items():
            if isinstance(value, torch.dtype):
                n.attrs[key].i = _ex._proto_dtype(value, f"attribute {key}")
            elif isinstance(value, bool):
                n.attrs[key].i = int(value)
            elif isinstance(value, int):
                n.attrs[key].i = value
            elif isinstance(value, float):
                n.attrs[key].f = value
            elif isinstance(value, str):
                n.attrs[key].s = value
            else:
                n.attrs[key].ints.v.extend(int(v) for v in value)
        if fx is not None:
            self._value[fx] = name
            self._dtype[name] = _result_dtype(fx)
            r = _result(fx)
            if isinstance(r, torch.Tensor):
                self.shapes[name] = tuple(r.shape)
            if (isinstance(r, torch.Tensor) and r.dim() > 0 and
                    _free(fx, 0) and
                    fx.meta["ex"][0].shape[0] == fx.meta["ex"][1].shape[0]):
                n.unbatched = True
        else:
            self._dtype[name] = dtype
        return name

    def _tensor(self, arg, display, path):
        """The value name of a tensor (or traced int) operand."""
        if isinstance(arg, torch.fx.Node):
            return self._use(arg, path)
        if isinstance(arg, torch.Tensor) and self._state.lookup(arg) is not None:
            return self._param(arg, path)  # a leaf module's weight
        raise _ex.ExportError(f"unsupported operand of {display} at module path "
                              f"'{path}': expected a tensor, got "
                              f"{type(arg).__name__}")

    def _cast(self, value, dtype, path):
        if self._dtype[value] == dtype:
            return value
        short = str(dtype).replace("torch.", "")
        return self._emit("cast", [value], {"dtype": dtype}, path=path,
                          dtype=dtype, base=f"{value}_{short}")

    def _constant(self, number, dtype, path):
        """A rank-0 tensor holding a Python number."""
        return self._emit("full", [], {"shape": [], "value": float(number),
                                       "dtype": dtype},
                          path=path, dtype=dtype, base="constant")

    def _ints(self, items, inputs, attrs, key):
        """An int-list attribute whose traced entries become inputs."""
        values, sources, symbolic = [], [], False
        for item in items:
            if _is_sym(item) or isinstance(item, _SymValue):
                inputs.append(item.name if isinstance(item, _SymValue)
                              else self._use(item, ""))
                values.append(0)
                sources.append(len(inputs))  # 1 + the input's index
                symbolic = True
            elif isinstance(item, int):
                values.append(int(item))
                sources.append(0)
            else:
                raise _ex.ExportError(f"expected an int or a size, got "
                                      f"{type(item).__name__} ({item!r})")
        attrs[key] = values
        if symbolic:
            attrs[key + "_from"] = sources

    def _int(self, item, inputs, attrs, key):
        if _is_sym(item) or isinstance(item, _SymValue):
            inputs.append(item.name if isinstance(item, _SymValue)
                          else self._use(item, ""))
            attrs[key + "_from"] = len(inputs)
        elif item is not None:
            attrs[key] = int(item)

    def _sizes_of(self, node):
        """x.shape as items: ints for fixed dims, traced ints for free ones."""
        items = []
        for d in range(_result(node).dim()):
            items.append(self._tracer_size(node, d))
        return items

    def _tracer_size(self, node, d):
        if not _free(node, d):
            return _result(node).shape[d]
        name = self._emit("size", [self._use(node, "")], {"dim": d},
                          dtype=torch.int64, base=f"{node.name}_size{d}")
        return _SymValue(name)

    # ---- handlers: elementwise ----------------------------------------------

    def _binary(self, node, display, path, op, a, b):
        out = _result_dtype(node)
        if out == torch.bool and op in ("add", "mul"):  # PyTorch's bool + is or, * is and
            op = "logical_or" if op == "add" else "logical_and"
        compare = op in ("eq", "ne", "lt", "le", "gt", "ge", "logical_and",
                         "logical_or")
        if compare:
            ta = self._operand_dtype(a, b)
            tb = self._operand_dtype(b, a)
            common = torch.promote_types(ta, tb)
        else:
            common = out
        if _is_number(a) or _is_number(b):
            scalar, other = (a, b) if _is_number(a) else (b, a)
            x = self._cast(self._tensor(other, display, path), common, path)
            if common in (torch.bfloat16, torch.float16):  # rounded, as PyTorch 1.13 takes it
                scalar = float(torch.tensor(float(scalar), dtype=common))
            attrs = {"scalar": float(scalar)}
            if _is_number(a):
                attrs["reverse"] = 1
            self._emit(op, [x], attrs, fx=node, path=path)
            return
        x = self._cast(self._tensor(a, display, path), common, path)
        y = self._cast(self._tensor(b, display, path), common, path)
        self._emit(op, [x, y], {}, fx=node, path=path)

    def _operand_dtype(self, x, other):
        if _is_number(x):
            od = (self._operand_dtype(other, None)
                  if other is not None and not _is_number(other) else torch.int64)
            if isinstance(x, float) and not od.is_floating_point:
                return torch.float32
            return od
        if isinstance(x, torch.fx.Node):
            return _result_dtype(x)
        if isinstance(x, torch.Tensor):
            return x.dtype
        return torch.float32

    def _unary(self, node, display, path, op, x, attrs=None):
        out = _result_dtype(node)
        v = self._tensor(x, display, path)
        if op != "logical_not":
            v = self._cast(v, out, path)
        self._emit(op, [v], attrs or {}, fx=node, path=path)

    # ---- handlers: shapes ----------------------------------------------------

    def _reshape(self, node, display, path, x, shape):
        inputs = [self._tensor(x, display, path)]
        attrs = {}
        self._ints(shape, inputs, attrs, "shape")
        self._emit("reshape", inputs, attrs, fx=node, path=path)

    def _permute(self, node, display, path, x, dims):
        rank = len(dims)
        self._emit("permute", [self._tensor(x, display, path)],
                   {"dims": [d % rank for d in dims]}, fx=node, path=path)

    def _transpose(self, node, display, path, x, d0, d1):
        rank = _result(node).dim()
        dims = list(range(rank))
        dims[d0 % rank], dims[d1 % rank] = dims[d1 % rank], dims[d0 % rank]
        self._permute(node, display, path, x, dims)

    def _slice_node(self, value, dim, start, stop, step, path, fx=None,
                    dtype=None):
        inputs, attrs = [value], {"dim": dim, "step": step or 1}
        if start is not None:
            self._int(start, inputs, attrs, "start")
        if stop is not None:
            self._int(stop, inputs, attrs, "stop")
        return self._emit("slice", inputs, attrs, fx=fx, path=path,
                          dtype=dtype)

    def _getitem(self, node, display, path):
        x, index = node.args
        if x in self._tuples:
            value = self._tuples[x][index]
            if value is None:  # an error only if something reads it
                self._poisoned[node] = (f"'{x.name}'[{index}] at module path '{path}' "
                                        "is not supported (attention weights: call "
                                        "with need_weights=False; max indices: use "
                                        "amax)")
                return
            self._emit("identity", [value], {}, fx=node, path=path)
            return
        if x in self._virtual:
            value, dim, start, stop = self._virtual[x][index]
            self._slice_node(value, dim, start, stop, 1, path, fx=node)
            return
        if not isinstance(x, torch.fx.Node) or not isinstance(_result(x), torch.Tensor):
            raise _ex.ExportError(f"unsupported indexing of '{getattr(x, 'name', x)}' "
                                  f"at module path '{path}'")
        items = list(index) if isinstance(index, tuple) else [index]
        if any(isinstance(i, (torch.fx.Node, torch.Tensor, list)) and not _is_sym(i)
               for i in items):
            raise _ex.ExportError(f"unsupported indexing with a tensor or list "
                                  f"(advanced indexing) at module path '{path}'")
        rank = _result(x).dim()
        explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
        value = self._tensor(x, display, path)
        dtype = self._dtype[value]
        # (op, args) applied in order, each dim counted in the tensor the
        # steps before it leave (a select's dim is gone: d stays).
        steps = []
        d = 0
        for item in items:
            if item is None:
                steps.append(("unsqueeze", d))
                d += 1
            elif item is Ellipsis:
                d += rank - explicit
            elif isinstance(item, slice):
                if not (item.start is None and item.stop is None and
                        item.step in (None, 1)):
                    if item.step is not None and (not isinstance(item.step, int) or item.step < 1):
                        raise _ex.ExportError(f"unsupported slice step {item.step!r} at "
                                              f"module path '{path}'")
                    steps.append(("slice", (d, item.start, item.stop, item.step)))
                d += 1
            else:  # an int (or a traced one)
                if _is_sym(item):
                    raise _ex.ExportError(f"indexing with a run-time integer at "
                                          f"module path '{path}' is not supported")
                steps.append(("select", (d, int(item))))
        if not steps:
            self._emit("identity", [value], {}, fx=node, path=path)
            return
        for i, (op, a) in enumerate(steps):
            last = i == len(steps) - 1
            fx = node if last else None
            if op == "unsqueeze":
                value = self._emit("unsqueeze", [value], {"dim": a}, fx=fx,
                                   path=path, dtype=dtype)
            elif op == "slice":
                dim, start, stop, step = a
                value = self._slice_node(value, dim, start, stop, step, path,
                                         fx=fx, dtype=dtype)
            else:
                dim, index = a
                value = self._emit("select", [value], {"dim": dim, "index": index},
                                   fx=fx, path=path, dtype=dtype)

    def _split(self, node, display, path, x, sizes, dim):
        ex = _result(x)
        dim = dim % ex.dim()
        if _free(x, dim):
            raise _ex.ExportError(f"{display} at module path '{path}' splits a "
                                  "dimension whose size is only known at run time")
        value = self._tensor(x, display, path)
        pieces, start = [], 0
        for piece in _result(node):
            stop = start + piece.shape[dim]
            pieces.append((value, dim, start, stop))
            start = stop
        self._virtual[node] = pieces

    # ---- handlers: creation ---------------------------------------------------

    def _full(self, node, display, path, shape, value):
        inputs, attrs = [], {"value": float(value), "dtype": _result_dtype(node)}
        self._ints(shape, inputs, attrs, "shape")
        self._emit("full", inputs, attrs, fx=node, path=path)

    def _arange(self, node, display, path):
        args = list(node.args)
        start, end, step = 0, None, 1
        if len(args) == 1:
            end = args[0]
        elif len(args) >= 2:
            start, end = args[0], args[1]
            if len(args) > 2:
                step = args[2]
        end = node.kwargs.get("end", end)
        start = node.kwargs.get("start", start)
        step = node.kwargs.get("step", step)
        for v in (start, end, step):
            if isinstance(v, float):
                raise _ex.ExportError(f"{display} with float bounds at module path "
                                      f"'{path}' is not supported")
        inputs, attrs = [], {"dtype": _result_dtype(node), "step": int(step)}
        self._int(start, inputs, attrs, "start")
        self._int(end, inputs, attrs, "end")
        self._emit("arange", inputs, attrs, fx=node, path=path)

    def _where(self, node, display, path, cond, a, b):
        out = _result_dtype(node)
        c = self._cast(self._tensor(cond, display, path), torch.bool, path)
        vals = []
        for v in (a, b):
            if _is_number(v):
                vals.append(self._constant(v, out, path))
            else:
                vals.append(self._cast(self._tensor(v, display, path), out, path))
        self._emit("where", [c] + vals, {}, fx=node, path=path)

    def _cat(self, node, display, path, tensors, dim, op):
        out = _result_dtype(node)
        vals = [self._cast(self._tensor(t, display, path), out, path)
                for t in tensors]
        self._emit(op, vals, {"dim": int(dim)}, fx=node, path=path)

    def _reduce(self, node, display, path, op, x, dim, keepdim):
        dims = [] if dim is None else ([dim] if isinstance(dim, int) else list(dim))
        v = self._cast(self._tensor(x, display, path), _result_dtype(node), path)
        self._emit(op, [v], {"dims": dims, "keepdim": int(bool(keepdim))},
                   fx=node, path=path)

    def _layer_norm(self, node, display, path, x, shape, weight, bias, eps):
        inputs = [self._tensor(x, display, path)]
        attrs = {"ndim": len(shape), "eps": float(eps),
                 "has_weight": int(weight is not None),
                 "has_bias": int(bias is not None)}
        for t in (weight, bias):
            if t is not None:
                inputs.append(self._tensor(t, display, path))
        self._emit("layer_norm", inputs, attrs, fx=node, path=path)

    def _linear(self, node, display, path, x, weight, bias):
        inputs = [self._tensor(x, display, path), self._tensor(weight, display, path)]
        if bias is not None:
            inputs.append(self._tensor(bias, display, path))
        self._emit("linear", inputs, {}, fx=node, path=path)


def _mha_projection(self, b, i, k, x, E, hd, emit, param_rows, display, path):
    """Input `k` (query, key or value; the i-th; its value x) of multi-head
    attention projected and split into heads: [L, N, E] -> [L, N*H, hd] ->
    [N*H, L, hd]."""
    if b["use_separate_proj_weight"]:
        w = self._tensor(b[k[0] + "_proj_weight"], display, path)
    else:
        w = param_rows(b["in_proj_weight"], i * E, (i + 1) * E)
    inputs = [x, w]
    if b["in_proj_bias"] is not None:
        inputs.append(param_rows(b["in_proj_bias"], i * E, (i + 1) * E))
    y = emit("linear", inputs)
    inputs, attrs = [y], {}
    self._ints([self._tracer_size(b[k], 0), -1, hd], inputs, attrs, "shape")
    y = emit("reshape", inputs, attrs)
    return emit("permute", [y], {"dims": [1, 0, 2]})


def _mha_padding_mask(self, node, b, m, H, path):
    """A bool key_padding_mask [N, S] as [N*H, 1, S]: every head of a batch
    row."""
    n_item = self._tracer_size(b["query"], 1)
    s_item = self._tracer_size(b["key"], 0)
    for op, shape in (("reshape", [n_item, 1, 1, s_item]), ("expand", [n_item, H, 1, s_item]),
                      ("reshape", [-1, 1, s_item])):
        inputs, attrs = [m], {}
        self._ints(shape, inputs, attrs, "shape")
        m = self._emit(op, inputs, attrs, path=path, dtype=torch.bool, base=f"{node.name}_kpm")
    return m


def _multi_head_attention(self, node, display, path):
    """F.multi_head_attention_forward (what nn.MultiheadAttention and the
    nn.Transformer* layers call), decomposed: input projections, heads,
    scaled scores, masks, softmax, values, output projection. Query, key
    and value are [L, N, E] (sequence first), as the function takes them."""
    names = ["query", "key", "value", "embed_dim_to_check", "num_heads",
             "in_proj_weight", "in_proj_bias", "bias_k", "bias_v", "add_zero_attn",
             "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight",
             "q_proj_weight", "k_proj_weight", "v_proj_weight", "static_k", "static_v",
             "average_attn_weights"]
    defaults = {"training": True, "key_padding_mask": None, "need_weights": True,
                "attn_mask": None, "use_separate_proj_weight": False, "q_proj_weight": None,
                "k_proj_weight": None, "v_proj_weight": None, "static_k": None,
                "static_v": None, "average_attn_weights": True}
    b = self._bind(node, [(n, defaults.get(n, _ex._REQUIRED)) for n in names], display, path)

    def unsupported(what):
        return _ex.ExportError(f"{display} at module path '{path}': {what} is not supported")
    if b["bias_k"] is not None or b["bias_v"] is not None or b["add_zero_attn"]:
        raise unsupported("add_bias_kv / add_zero_attn")
    if b["static_k"] is not None or b["static_v"] is not None:
        raise unsupported("static_k / static_v")
    if b["training"] and b["dropout_p"] > 0:
        raise unsupported("dropout in training mode (call module.eval())")
    query = b["query"]
    if _result(query).dim() != 3:
        raise unsupported("an unbatched (2-D) query")
    dtype = _result(query).dtype
    E = _result(query).shape[-1]
    H = int(b["num_heads"])
    hd = E // H

    def emit(op, inputs, attrs=None):
        return self._emit(op, inputs, attrs or {}, path=path, dtype=dtype, base=f"{node.name}_{op}")

    def param_rows(t, lo, hi):
        v = self._tensor(t, display, path)
        return emit("slice", [v], {"dim": 0, "start": lo, "stop": hi, "step": 1})

    x = {k: self._tensor(b[k], display, path) for k in ("query", "key", "value")}
    projected = {k: _mha_projection(self, b, i, k, x[k], E, hd, emit, param_rows, display, path)
                 for i, k in enumerate(("query", "key", "value"))}
    kt = emit("permute", [projected["key"]], {"dims": [0, 2, 1]})
    scores = emit("matmul", [projected["query"], kt])
    scores = emit("mul", [scores], {"scalar": 1.0 / math.sqrt(hd)})
    for mask_name in ("attn_mask", "key_padding_mask"):
        mask = b[mask_name]
        if mask is None:
            continue
        m = self._tensor(mask, display, path)
        if mask_name == "key_padding_mask":
            if self._dtype[m] != torch.bool:
                raise unsupported("a float key_padding_mask")
            m = _mha_padding_mask(self, node, b, m, H, path)
        if self._dtype[m] == torch.bool:
            inf = self._constant(float("-inf"), dtype, path)
            scores = emit("where", [m, inf, scores])
        else:
            scores = emit("add", [scores, self._cast(m, dtype, path)])
    attn = emit("softmax", [scores], {"dim": -1})
    out = emit("matmul", [attn, projected["value"]])      # [N*H, L, hd]
    out = emit("permute", [out], {"dims": [1, 0, 2]})       # [L, N*H, hd]
    inputs, attrs = [out], {}
    self._ints([self._tracer_size(b["query"], 0), self._tracer_size(b["query"], 1), E],
               inputs, attrs, "shape")
    out = self._emit("reshape", inputs, attrs, path=path, dtype=dtype, base=f"{node.name}_out")
    inputs = [out, self._tensor(b["out_proj_weight"], display, path)]
    if b["out_proj_bias"] is not None:
        inputs.append(self._tensor(b["out_proj_bias"], display, path))
    out = emit("linear", inputs)
    self._tuples[node] = [out, None]


class _SymValue:
    """A traced int made by the converter itself (a `size` node's value)."""

    def __init__(self, name):
        self.name = name


def _bound(params, body):
    """A handler that binds the call's arguments to `params` ([(name,
    default)], _REQUIRED for none) and calls body(self, node, display,
    path, bound)."""
    def handler(self, node, display, path):
        b = self._bind(node, params, display, path)
        body(self, node, display, path, b)
    return handler

def _register_binary(fn, meth):
    """Arithmetic, comparisons and logic on two operands."""
    R = _ex._REQUIRED

    def binary(op, names=("input", "other"), alpha=False):
        params = [(names[0], R), (names[1], R)] + ([("alpha", 1)] if alpha else [])

        def body(self, node, display, path, b):
            if b.get("alpha", 1) != 1:
                raise _ex.ExportError(f"unsupported op {display} with alpha="
                                      f"{b['alpha']} at module path '{path}'")
            self._binary(node, display, path, op, b[names[0]], b[names[1]])
        return _bound(params, body)

    for name, op in (("add", "add"), ("sub", "sub"), ("mul", "mul"),
                     ("truediv", "div"), ("floordiv", "floordiv"),
                     ("pow", "pow"), ("eq", "eq"), ("ne", "ne"), ("lt", "lt"),
                     ("le", "le"), ("gt", "gt"), ("ge", "ge")):
        fn[getattr(operator, name)] = binary(op, ("a", "b"))

    for name, op, alpha in (("add", "add", True), ("sub", "sub", True),
                            ("mul", "mul", False), ("pow", "pow", False),
                            ("eq", "eq", False), ("ne", "ne", False),
                            ("lt", "lt", False), ("le", "le", False),
                            ("gt", "gt", False), ("ge", "ge", False),
                            ("maximum", "maximum", False),
                            ("minimum", "minimum", False),
                            ("logical_and", "logical_and", False),
                            ("logical_or", "logical_or", False),
                            ("floor_divide", "floordiv", False)):
        fn[getattr(torch, name)] = binary(op, ("input", "other"), alpha)
        meth[name] = binary(op, ("self", "other"), alpha)
    meth["masked_fill"] = _bound([("self", R), ("mask", R), ("value", R)],
                                lambda self, n, d, p, b: self._where(
                                    n, d, p, b["mask"], b["value"], b["self"]))
    fn[torch.masked_fill] = _bound([("input", R), ("mask", R), ("value", R)],
                                  lambda self, n, d, p, b: self._where(
                                      n, d, p, b["mask"], b["value"], b["input"]))

    def div(names):
        def body(self, node, display, path, b):
            mode = b.get("rounding_mode")
            if mode not in (None, "floor"):
                raise _ex.ExportError(f"unsupported {display} rounding_mode="
                                      f"{mode!r} at module path '{path}'")
            self._binary(node, display, path, "floordiv" if mode else "div",
                         b[names[0]], b[names[1]])
        return _bound([(names[0], R), (names[1], R), ("rounding_mode", None)], body)
    fn[torch.div] = div(("input", "other"))
    fn[torch.true_divide] = div(("input", "other"))
    meth["div"] = div(("self", "other"))
    meth["__truediv__"] = div(("self", "other"))
    meth["__rtruediv__"] = _bound([("self", R), ("other", R)],
                                 lambda self, n, d, p, b: self._binary(
                                     n, d, p, "div", b["other"], b["self"]))


def _check_bool_operand(self, arg, display, path):
    """Refuses a bitwise op's operand that is not bool: on integers &, | and
    ~ are bitwise, which the graph's logical ops are not."""
    dtype = torch.bool if isinstance(arg, bool) else self._operand_dtype(arg, None)
    if dtype != torch.bool:
        raise _ex.ExportError(f"unsupported bitwise {display} on {dtype} at module path "
                              f"'{path}' (only on bool tensors, where it is logical)")


def _register_inplace_and_bitwise(fn, meth):
    """x += y and the like; &, | and ~, logical on bool only."""
    R = _ex._REQUIRED
    def inplace(op):  # x += y (exporter's _ExProxy.__iadd__)
        def body(self, node, display, path, b):
            self._check_inplace(node, b["a"], display, path)
            self._binary(node, display, path, op, b["a"], b["b"])
        return _bound([("a", R), ("b", R)], body)
    for name, op in (("iadd", "add"), ("isub", "sub"), ("imul", "mul"), ("itruediv", "div")):
        fn[getattr(operator, name)] = inplace(op)

    def bitwise(op, names):  # &, |: logical on bool, unsupported on integers
        def body(self, node, display, path, b):
            for arg in (b[n] for n in names):
                _check_bool_operand(self, arg, display, path)
            self._binary(node, display, path, op, b[names[0]], b[names[1]])
        return _bound([(n, R) for n in names], body)
    fn[operator.and_] = bitwise("logical_and", ("a", "b"))
    fn[operator.or_] = bitwise("logical_or", ("a", "b"))
    meth["__and__"] = bitwise("logical_and", ("self", "other"))
    meth["__or__"] = bitwise("logical_or", ("self", "other"))

    def invert(first):  # ~: logical not on bool, unsupported on integers
        def body(self, node, display, path, b):
            _check_bool_operand(self, b[first], display, path)
            self._unary(node, display, path, "logical_not", b[first])
        return _bound([(first, R)], body)
    fn[operator.invert] = invert("a")
    meth["__invert__"] = invert("self")


def _register_unary(fn, meth):
    """Elementwise ops of one operand, and no-ops."""
    R = _ex._REQUIRED

    def unary(op, first="input", extra=(), attrs=lambda b: {}):
        def body(self, node, display, path, b):
            if b.get("inplace"):
                self._check_inplace(node, b[first], display, path)
            self._unary(node, display, path, op, b[first], attrs(b))
        return _bound([(first, R)] + list(extra), body)

    for name in ("relu", "tanh", "sigmoid", "sqrt", "rsqrt", "exp", "log",
                 "cos", "sin", "neg", "abs", "logical_not"):
        fn[getattr(torch, name)] = unary(name)
        meth[name] = unary(name, "self")
    fn[operator.neg] = unary("neg", "a")
    fn[F.relu] = unary("relu", extra=[("inplace", False)])
    fn[F.silu] = unary("silu", extra=[("inplace", False)])
    fn[F.sigmoid] = unary("sigmoid")
    fn[F.tanh] = unary("tanh")
    fn[F.gelu] = unary("gelu", extra=[("approximate", "none")],
                       attrs=lambda b: {"approximate": b["approximate"]})

    def identity(first):
        def body(self, node, display, path, b):
            self._emit("identity", [self._tensor(b[first], display, path)], {},
                       fx=node, path=path)
        return body
    meth["contiguous"] = _bound([("self", R), ("memory_format", None)], identity("self"))
    meth["detach"] = _bound([("self", R)], identity("self"))
    def dropout_fn(self, node, display, path, b):
        if b["training"] and b["p"] > 0:
            raise _ex.ExportError(f"unsupported {display} in training mode "
                                  f"(p={b['p']}) at module path '{path}'")
        identity("input")(self, node, display, path, b)
    fn[F.dropout] = _bound([("input", R), ("p", 0.5), ("training", True),
                           ("inplace", False)], dropout_fn)

    def pipe(self, node, display, path):
        self._graph.nodes.add(name=node.name, op="pipe_split", module_path=path)
    fn[_ex.pipe_split] = pipe

    def clone(first):
        def body(self, node, display, path, b):
            self._emit("clone", [self._tensor(b[first], display, path)], {},
                       fx=node, path=path)
        return _bound([(first, R), ("memory_format", None)], body)
    fn[torch.clone] = clone("input")
    meth["clone"] = clone("self")


def _register_gemms(fn, meth):
    """Matrix products, linear layers, addmm and baddbmm."""
    R = _ex._REQUIRED

    def gemm(op, names):
        def body(self, node, display, path, b):
            out = _result_dtype(node)
            a = self._cast(self._tensor(b[names[0]], display, path), out, path)
            c = self._cast(self._tensor(b[names[1]], display, path), out, path)
            self._emit(op, [a, c], {}, fx=node, path=path)
        return _bound([(names[0], R), (names[1], R)], body)
    fn[torch.mm] = gemm("mm", ("input", "mat2"))
    fn[torch.matmul] = gemm("matmul", ("input", "other"))
    fn[torch.bmm] = gemm("matmul", ("input", "mat2"))
    fn[operator.matmul] = gemm("matmul", ("a", "b"))
    meth["mm"] = gemm("mm", ("self", "mat2"))
    meth["matmul"] = gemm("matmul", ("self", "other"))
    meth["bmm"] = gemm("matmul", ("self", "mat2"))
    fn[F.linear] = _bound([("input", R), ("weight", R), ("bias", None)],
                         lambda self, n, d, p, b: self._linear(
                             n, d, p, b["input"], b["weight"], b["bias"]))

    def addmm(self, node, display, path, b):
        vals = [self._tensor(b[k], display, path) for k in ("input", "mat1", "mat2")]
        self._emit("addmm", vals, {"beta": float(b["beta"]), "alpha": float(b["alpha"])},
                   fx=node, path=path)
    fn[torch.addmm] = _bound([("input", R), ("mat1", R), ("mat2", R), ("beta", 1),
                             ("alpha", 1)], addmm)

    def baddbmm(first):
        def body(self, node, display, path, b):
            # beta * input + alpha * (batch1 @ batch2)
            dtype = _result_dtype(node)
            x = self._cast(self._tensor(b[first], display, path), dtype, path)
            p = self._emit("matmul", [self._cast(self._tensor(b["batch1"], display, path),
                                                 dtype, path),
                                      self._cast(self._tensor(b["batch2"], display, path),
                                                 dtype, path)],
                           {}, path=path, dtype=dtype, base=f"{node.name}_bmm")
            if b["alpha"] != 1:
                p = self._emit("mul", [p], {"scalar": float(b["alpha"])}, path=path,
                               dtype=dtype, base=f"{node.name}_alpha")
            if b["beta"] != 1:
                x = self._emit("mul", [x], {"scalar": float(b["beta"])}, path=path,
                               dtype=dtype, base=f"{node.name}_beta")
            self._emit("add", [x, p], {}, fx=node, path=path)
        return _bound([(first, R), ("batch1", R), ("batch2", R), ("beta", 1), ("alpha", 1)], body)
    fn[torch.baddbmm] = baddbmm("input")
    meth["baddbmm"] = baddbmm("self")


def _register_norms(fn, meth):
    """Softmax, layer norm and embedding."""
    R = _ex._REQUIRED

    def softmax(op):
        def body(self, node, display, path, b):
            if b["dim"] is None:
                raise _ex.ExportError(f"{display} at module path '{path}' needs dim")
            x = self._tensor(b[list(b)[0]], display, path)
            x = self._cast(x, _result_dtype(node), path)
            self._emit(op, [x], {"dim": int(b["dim"])}, fx=node, path=path)
        return body
    for name in ("softmax", "log_softmax"):
        fn[getattr(F, name)] = _bound([("input", R), ("dim", None),
                                      ("_stacklevel", 3), ("dtype", None)], softmax(name))
        fn[getattr(torch, name)] = _bound([("input", R), ("dim", None),
                                          ("dtype", None)], softmax(name))
        meth[name] = _bound([("self", R), ("dim", None), ("dtype", None)], softmax(name))
    fn[F.layer_norm] = _bound([("input", R), ("normalized_shape", R), ("weight", None),
                              ("bias", None), ("eps", 1e-5)],
                             lambda self, n, d, p, b: self._layer_norm(
                                 n, d, p, b["input"], list(b["normalized_shape"]),
                                 b["weight"], b["bias"], b["eps"]))

    def embedding(self, node, display, path, b):
        if b["max_norm"] is not None:  # as nn.Embedding's: it renormalises weight rows in place
            raise _ex.ExportError(f"unsupported {display} with max_norm at '{path}'")
        ids = self._tensor(b["input"], display, path)
        w = self._tensor(b["weight"], display, path)
        self._emit("embedding", [ids, w], {}, fx=node, path=path)
    fn[F.embedding] = _bound([("input", R), ("weight", R), ("padding_idx", None),
                             ("max_norm", None), ("norm_type", 2.0),
                             ("scale_grad_by_freq", False), ("sparse", False)], embedding)


def _register_reductions(fn, meth):
    """sum, mean, amax and max."""
    R = _ex._REQUIRED
    for name, op in (("sum", "sum"), ("mean", "mean"), ("amax", "amax")):
        def red(op=op, first="input"):
            return lambda self, n, d, p, b: self._reduce(
                n, d, p, op, b[first], b["dim"], b["keepdim"])
        fn[getattr(torch, name)] = _bound([("input", R), ("dim", None), ("keepdim", False),
                                          ("dtype", None)], red())
        meth[name] = _bound([("self", R), ("dim", None), ("keepdim", False),
                            ("dtype", None)], red(first="self"))

    def max_(first):
        # x.max() is amax over everything; x.max(dim) is (values, indices):
        # the values are amax, the indices are not supported.
        def handler(self, node, display, path):
            b = self._bind(node, [(first, R), ("dim", None), ("keepdim", False)], display, path)
            if b["dim"] is None or isinstance(b["dim"], torch.fx.Node):
                if isinstance(b["dim"], torch.fx.Node):  # torch.max(a, b): elementwise
                    self._binary(node, display, path, "maximum", b[first], b["dim"])
                    return
                self._reduce(node, display, path, "amax", b[first], None, False)
                return
            x = self._tensor(b[first], display, path)
            values = self._emit("amax", [x], {"dims": [int(b["dim"])],
                                              "keepdim": int(bool(b["keepdim"]))},
                                path=path, dtype=self._dtype[x], base=f"{node.name}_values")
            self._tuples[node] = [values, None]
        return handler
    fn[torch.max] = max_("input")
    meth["max"] = max_("self")


def _register_shapes(fn, meth):
    """Views, reshapes, flattens, permutes and transposes."""
    R = _ex._REQUIRED

    def view(self, node, display, path):
        self._reshape(node, display, path, node.args[0], _varargs(node, 1))
    meth["view"] = view
    meth["reshape"] = view
    fn[torch.reshape] = lambda self, n, d, p: self._reshape(
        n, d, p, n.args[0], list(_arg(n, 1, "shape")))

    def flatten(self, node, display, path, b):
        x = b[list(b)[0]]
        rank = _result(x).dim()
        s, e = b["start_dim"] % max(rank, 1), b["end_dim"] % max(rank, 1)
        sizes = self._sizes_of(x)
        self._reshape(node, display, path, x, sizes[:s] + [-1] + sizes[e + 1:])
    fn[torch.flatten] = _bound([("input", R), ("start_dim", 0), ("end_dim", -1)], flatten)
    meth["flatten"] = _bound([("self", R), ("start_dim", 0), ("end_dim", -1)], flatten)

    def permute(self, node, display, path):
        self._permute(node, display, path, node.args[0], _varargs(node, 1))
    meth["permute"] = permute
    fn[torch.permute] = lambda self, n, d, p: self._permute(
        n, d, p, n.args[0], list(_arg(n, 1, "dims")))

    def transpose(first):
        return lambda self, n, d, p, b: self._transpose(n, d, p, b[first], b["dim0"], b["dim1"])
    fn[torch.transpose] = _bound([("input", R), ("dim0", R), ("dim1", R)], transpose("input"))
    meth["transpose"] = _bound([("self", R), ("dim0", R), ("dim1", R)], transpose("self"))

    def t(self, node, display, path, b):
        self._transpose(node, display, path, b["self"], 0, 1)
    meth["t"] = _bound([("self", R)], t)


def _register_squeezes(fn, meth):
    """Squeezes, unsqueezes and expands."""
    R = _ex._REQUIRED

    def unsqueeze(first):
        def body(self, node, display, path, b):
            rank = _result(node).dim()
            self._emit("unsqueeze", [self._tensor(b[first], display, path)],
                       {"dim": b["dim"] % rank}, fx=node, path=path)
        return _bound([(first, R), ("dim", R)], body)
    fn[torch.unsqueeze] = unsqueeze("input")
    meth["unsqueeze"] = unsqueeze("self")

    def squeeze(first):
        def body(self, node, display, path, b):
            x = b[first]
            rank = _result(x).dim()
            if b["dim"] is None:  # the dims of size 1 in every example: never the batch
                examples = x.meta["ex"] if isinstance(x, torch.fx.Node) else [x]
                dims = [d for d in range(rank) if all(e.shape[d] == 1 for e in examples)]
            else:
                dims = [b["dim"] % rank]
            self._emit("squeeze", [self._tensor(b[first], display, path)],
                       {"dims": dims}, fx=node, path=path)
        return _bound([(first, R), ("dim", None)], body)
    fn[torch.squeeze] = squeeze("input")
    meth["squeeze"] = squeeze("self")

    def expand(self, node, display, path):
        inputs, attrs = [self._tensor(node.args[0], display, path)], {}
        self._ints(_varargs(node, 1), inputs, attrs, "shape")
        self._emit("expand", inputs, attrs, fx=node, path=path)
    meth["expand"] = expand

    def expand_as(self, node, display, path, b):
        inputs, attrs = [self._tensor(b["self"], display, path)], {}
        self._ints(self._sizes_of(b["other"]), inputs, attrs, "shape")
        self._emit("expand", inputs, attrs, fx=node, path=path)
    meth["expand_as"] = _bound([("self", R), ("other", R)], expand_as)


def _register_joins(fn, meth):
    """Splits, indexing, cat and stack, where, triangles, attention."""
    R = _ex._REQUIRED

    def split(first, chunk=False):
        def body(self, node, display, path, b):
            self._split(node, display, path, b[first], None, b["dim"])
        key = "chunks" if chunk else "split_size_or_sections"
        return _bound([(first, R), (key, R), ("dim", 0)], body)
    fn[torch.split] = split("tensor")
    fn[torch.chunk] = split("input", True)
    meth["split"] = _bound([("self", R), ("split_size", R), ("dim", 0)],
                          lambda self, n, d, p, b: self._split(n, d, p, b["self"], None, b["dim"]))
    meth["chunk"] = split("self", True)
    fn[operator.getitem] = lambda self, n, d, p: self._getitem(n, d, p)

    for name in ("cat", "concat", "stack"):
        op = "stack" if name == "stack" else "cat"
        if hasattr(torch, name):
            fn[getattr(torch, name)] = _bound(
                [("tensors", R), ("dim", 0)],
                lambda self, n, d, p, b, op=op: self._cat(n, d, p, b["tensors"], b["dim"], op))

    fn[F.multi_head_attention_forward] = _multi_head_attention
    fn[torch.where] = _bound([("condition", R), ("input", R), ("other", R)],
                            lambda self, n, d, p, b: self._where(
                                n, d, p, b["condition"], b["input"], b["other"]))

    def tri(op, first):
        def body(self, node, display, path, b):
            self._emit(op, [self._tensor(b[first], display, path)],
                       {"diagonal": int(b["diagonal"])}, fx=node, path=path)
        return _bound([(first, R), ("diagonal", 0)], body)
    for op in ("triu", "tril"):
        fn[getattr(torch, op)] = tri(op, "input")
        meth[op] = tri(op, "self")


def _register_creation(fn, meth):
    """Constants, ranges, casts and sizes."""
    def creation(value):
        def handler(self, node, display, path):
            for k in node.kwargs:
                if k not in ("dtype", "device", "requires_grad", "layout"):
                    raise _ex.ExportError(f"unsupported argument '{k}' of {display} "
                                          f"at module path '{path}'")
            self._full(node, display, path, _varargs(node, 0), value)
        return handler
    fn[torch.zeros] = creation(0.0)
    fn[torch.ones] = creation(1.0)

    def full(self, node, display, path):
        self._full(node, display, path, list(_arg(node, 0, "size")),
                   _arg(node, 1, "fill_value"))
    fn[torch.full] = full

    def like(value):
        def handler(self, node, display, path):
            x = node.args[0]
            v = value if value is not None else _arg(node, 1, "fill_value")
            self._full(node, display, path, self._sizes_of(x), v)
        return handler
    fn[torch.zeros_like] = like(0.0)
    fn[torch.ones_like] = like(1.0)
    fn[torch.full_like] = like(None)
    fn[torch.arange] = lambda self, n, d, p: self._arange(n, d, p)

    def cast_to(dtype_of):
        def handler(self, node, display, path):
            x = self._tensor(node.args[0], display, path)
            out = _result_dtype(node)
            if self._dtype[x] == out:
                self._emit("identity", [x], {}, fx=node, path=path)
            else:
                self._emit("cast", [x], {"dtype": out}, fx=node, path=path)
        return handler
    for name in ("to", "type", "type_as", "float", "half", "bfloat16", "long",
                 "int", "bool", "double"):
        meth[name] = cast_to(name)

    def size(self, node, display, path):
        self._emit("size", [self._tensor(node.args[0], display, path)],
                   {"dim": int(node.args[1])}, fx=node, path=path)
    meth["size"] = size


def _module_handlers():
    """[(module class, handler)] for modules called as a whole."""
    R = _ex._REQUIRED
    modules = []

    def module_unary(op, attrs=lambda m: {}):
        def handler(self, node, m, display, path):
            (x,) = self._bind(node, [("input", R)], display, path).values()
            if getattr(m, "inplace", False):
                self._check_inplace(node, x, display, path)
            self._unary(node, display, path, op, x, attrs(m))
        return handler

    def linear(self, node, m, display, path):
        (x,) = self._bind(node, [("input", R)], display, path).values()
        self._linear(node, display, path, x, m.weight, m.bias)
    modules.append((torch.nn.Linear, linear))
    modules.append((torch.nn.ReLU, module_unary("relu")))
    modules.append((torch.nn.GELU, module_unary(
        "gelu", lambda m: {"approximate": getattr(m, "approximate", "none")})))
    modules.append((torch.nn.SiLU, module_unary("silu")))
    modules.append((torch.nn.Tanh, module_unary("tanh")))
    modules.append((torch.nn.Sigmoid, module_unary("sigmoid")))

    def dropout(self, node, m, display, path):
        if isinstance(m, torch.nn.Dropout) and m.training and m.p > 0:
            raise _ex.ExportError(f"unsupported module {display} in training "
                                  f"mode (p={m.p}) at '{path}'; call "
                                  "module.eval() before export")
        (x,) = self._bind(node, [("input", R)], display, path).values()
        self._emit("identity", [self._tensor(x, display, path)], {}, fx=node, path=path)
    modules.append((torch.nn.Identity, dropout))
    modules.append((torch.nn.Dropout, dropout))
    return modules + _module_norm_handlers()


def _module_norm_handlers():
    """[(module class, handler)] for layer norm, embedding and softmax
    modules."""
    R = _ex._REQUIRED
    modules = []

    def layer_norm(self, node, m, display, path):
        (x,) = self._bind(node, [("input", R)], display, path).values()
        self._layer_norm(node, display, path, x, list(m.normalized_shape),
                         m.weight, m.bias, m.eps)
    modules.append((torch.nn.LayerNorm, layer_norm))

    def embedding_module(self, node, m, display, path):
        (x,) = self._bind(node, [("input", R)], display, path).values()
        if m.max_norm is not None:
            raise _ex.ExportError(f"unsupported {display} with max_norm at '{path}'")
        self._emit("embedding", [self._tensor(x, display, path),
                                 self._tensor(m.weight, display, path)], {},
                   fx=node, path=path)
    modules.append((torch.nn.Embedding, embedding_module))

    def softmax_module(op):
        def handler(self, node, m, display, path):
            (x,) = self._bind(node, [("input", R)], display, path).values()
            if m.dim is None:
                raise _ex.ExportError(f"{display} at '{path}' needs dim")
            self._emit(op, [self._tensor(x, display, path)], {"dim": int(m.dim)},
                       fx=node, path=path)
        return handler
    modules.append((torch.nn.Softmax, softmax_module("softmax")))
    modules.append((torch.nn.LogSoftmax, softmax_module("log_softmax")))
    return modules


def _handlers():
    """(functions, methods, modules) tables: target -> handler."""
    fn, meth = {}, {}
    for register in (_register_binary, _register_inplace_and_bitwise, _register_unary,
                     _register_gemms, _register_norms, _register_reductions, _register_shapes,
                     _register_squeezes, _register_joins, _register_creation):
        register(fn, meth)
    return fn, meth, _module_handlers()


OpConverter.FUNCTIONS, OpConverter.METHODS, OpConverter.MODULES = _handlers()
