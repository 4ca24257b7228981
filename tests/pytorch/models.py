"""Models for pipeserve's tests: PyTorch's pipelining test models, written
with `pipeserve.pipe_split`, plus small ones for cases the C++ tests need.

ExampleCode, MultiMLP and ModelWithParamAlias are the models of PyTorch's
test/distributed/pipelining/test_pipe.py (and its model_registry.py);
ExampleCodeCval is model_registry's newer ExampleCode(d_hid, splits) with a
buffer; MultiMLPList and TransformerLike cut with split_spec instead of
markers.

Every factory seeds torch before building, so weights are deterministic:

    import models
    model = models.make("example_code")       # seeded, eval mode
    x, y = torch.randn(16, 512), torch.randn(16, 512)
    out = model(x, y)

A model that needs a split_spec carries it as `model.split_spec`. The
`pipeserve` package must be importable (PYTHONPATH=client/python).
"""

import torch

from pipeserve import SplitPoint, pipe_split

D_HID = 512  # test_pipe.py's d_hid


class MLPModule(torch.nn.Module):
    """model_registry's MLPModule: net1, ReLU, net2."""

    def __init__(self, d_hid):
        super().__init__()
        self.net1 = torch.nn.Linear(d_hid, d_hid)
        self.relu = torch.nn.ReLU()
        self.net2 = torch.nn.Linear(d_hid, d_hid)

    def forward(self, x):
        x = self.net1(x)
        x = self.relu(x)
        x = self.net2(x)
        return x


class ExampleCode(torch.nn.Module):
    """test_pipe.py's ExampleCode: 4 stages; mm_param1 is read in stages 0
    and 1, skip_connection flows from stage 0 to stage 2."""

    def __init__(self, d_hid=D_HID):
        super().__init__()
        self.mm_param1 = torch.nn.Parameter(torch.randn(d_hid, d_hid))
        self.mm_param2 = torch.nn.Parameter(torch.randn(d_hid, d_hid))
        self.lin1 = torch.nn.Linear(d_hid, d_hid)
        self.lin2 = torch.nn.Linear(d_hid, d_hid)

    def forward(self, x, y):
        x = torch.mm(x, self.mm_param1)  # multi-use param
        skip_connection = x
        x = x + y
        x = torch.relu(x)
        pipe_split()
        x = torch.mm(x, self.mm_param1)  # multi-use param
        x = self.lin1(x)
        pipe_split()
        x = torch.relu(x)
        x = x + skip_connection
        x = torch.mm(x, self.mm_param2)
        pipe_split()
        x = self.lin2(x)
        x = torch.relu(x)
        return x


class MultiMLP(torch.nn.Module):
    """test_pipe.py's MultiMLP: 4 stages; y is read only by the last."""

    def __init__(self, d_hid=D_HID):
        super().__init__()
        self.mlp0 = MLPModule(d_hid)
        self.mlp1 = MLPModule(d_hid)
        self.mlp2 = MLPModule(d_hid)
        self.mlp3 = MLPModule(d_hid)

    def forward(self, x, y):
        x = self.mlp0(x)
        pipe_split()
        x = self.mlp1(x)
        pipe_split()
        x = self.mlp2(x)
        pipe_split()
        x = self.mlp3(x)
        return x - y


class ModelWithParamAlias(torch.nn.Module):
    """model_registry's ModelWithParamAlias: 2 stages; one Parameter and one
    Linear, each under two names."""

    def __init__(self, d_hid=D_HID):
        super().__init__()
        self.mm_param1 = self.mm_param0 = torch.nn.Parameter(
            torch.randn(d_hid, d_hid))
        self.lin1 = self.lin0 = torch.nn.Linear(d_hid, d_hid)

    def forward(self, x, y):
        x = torch.mm(x, self.mm_param0) + y
        x = self.lin0(x)
        x = torch.relu(x)
        pipe_split()
        x = torch.mm(x, self.mm_param1)
        x = self.lin1(x)
        x = torch.relu(x)
        return x


class ExampleCodeCval(torch.nn.Module):
    """model_registry's ExampleCode(d_hid, splits): `splits` stages; the
    buffer cval is cloned in stage 0 and added (broadcast over rows) in 1."""

    def __init__(self, d_hid=D_HID, splits=2):
        super().__init__()
        assert 2 <= splits <= 4
        self.splits = splits
        self.mm_param0 = torch.nn.Parameter(torch.randn(d_hid, d_hid))
        self.mm_param1 = torch.nn.Parameter(torch.randn(d_hid, d_hid))
        self.register_buffer("cval", torch.randn((d_hid,)))
        self.lin0 = torch.nn.Linear(d_hid, d_hid)
        self.lin1 = torch.nn.Linear(d_hid, d_hid)

    def forward(self, x):
        x = torch.mm(x, self.mm_param0)
        x = torch.relu(x)
        a_constant = self.cval.clone()
        x = self.lin0(x)
        pipe_split()
        x = torch.relu(x) + a_constant
        x = torch.mm(x, self.mm_param1)
        if self.splits > 2:
            pipe_split()
            x = self.lin1(x)
            x = torch.relu(x)
        if self.splits > 3:
            pipe_split()
            x = torch.relu(x)
        return x


class MultiMLPList(torch.nn.Module):
    """model_registry's MultiMLP: no markers; split_spec cuts before every
    layer but the first, so n layers give n stages."""

    def __init__(self, d_hid=D_HID, n_layers=4):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            [MLPModule(d_hid) for _ in range(n_layers)])
        self.split_spec = {f"layers.{i}": SplitPoint.BEGINNING
                           for i in range(1, n_layers)}

    def forward(self, x, y):
        for layer in self.layers:
            x = layer(x)
        return x - y


class TransformerLike(torch.nn.Module):
    """test_transformer.py's model: 8 MLPModule(16) in a Sequential, cut
    before layers.4 into 2 stages."""

    def __init__(self, d_hid=16, n_layers=8):
        super().__init__()
        self.layers = torch.nn.Sequential(
            *[MLPModule(d_hid) for _ in range(n_layers)])
        self.split_spec = {"layers.4": SplitPoint.BEGINNING}

    def forward(self, x):
        return self.layers(x)


class SkipTwo(torch.nn.Module):
    """4 stages; `s`, made in stage 0, is read next in stage 3. Also covers
    scalar operands: `1.0 - x` (reverse) and `x * 0.5`."""

    def __init__(self, d_hid=128):
        super().__init__()
        self.lin0 = torch.nn.Linear(d_hid, d_hid)
        self.lin1 = torch.nn.Linear(d_hid, d_hid)
        self.lin2 = torch.nn.Linear(d_hid, d_hid)
        self.lin3 = torch.nn.Linear(d_hid, d_hid)

    def forward(self, x):
        s = torch.relu(self.lin0(x))
        x = 1.0 - self.lin1(s)
        pipe_split()
        x = torch.relu(self.lin2(x)) * 0.5
        pipe_split()
        x = self.lin3(x)
        pipe_split()
        return torch.relu(x) + s


class LateInput(torch.nn.Module):
    """3 stages; input y is read only by the last stage (x * y)."""

    def __init__(self, d_hid=128):
        super().__init__()
        self.lin0 = torch.nn.Linear(d_hid, d_hid)
        self.lin1 = torch.nn.Linear(d_hid, d_hid)

    def forward(self, x, y):
        x = torch.relu(self.lin0(x))
        pipe_split()
        x = self.lin1(x)
        pipe_split()
        x = torch.relu(x)
        return x * y


class ParamThreeStages(torch.nn.Module):
    """3 stages that all read the Parameter w (mm, Tensor.mm, matmul). Also
    covers clone, contiguous and detach."""

    def __init__(self, d_hid=128):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(d_hid, d_hid) / d_hid ** 0.5)
        self.register_buffer("bias", torch.randn(d_hid))

    def forward(self, x):
        x = torch.mm(x, self.w)
        pipe_split()
        x = torch.relu(x.mm(self.w)).contiguous()
        pipe_split()
        x = torch.matmul(x, self.w).detach()
        return x.clone() + self.bias


class NoMarkers(torch.nn.Module):
    """6 Linear + ReLU layers and no cut points: 1 stage as exported, for the
    partitioner's automatic cutting."""

    def __init__(self, d_hid=128, n_layers=6):
        super().__init__()
        layers = []
        for _ in range(n_layers):
            layers += [torch.nn.Linear(d_hid, d_hid), torch.nn.ReLU()]
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class Unsupported(torch.nn.Module):
    """Uses nn.Conv2d at 'features.0', which pipeserve cannot export."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))

    def forward(self, x):
        return self.features(x)


# name -> (class, constructor kwargs, input names, input feature size)
_MODELS = {
    "example_code": (ExampleCode, {}, ("x", "y"), D_HID),
    "multi_mlp": (MultiMLP, {}, ("x", "y"), D_HID),
    "param_alias": (ModelWithParamAlias, {}, ("x", "y"), D_HID),
    "cval2": (ExampleCodeCval, {"splits": 2}, ("x",), D_HID),
    "cval3": (ExampleCodeCval, {"splits": 3}, ("x",), D_HID),
    "cval4": (ExampleCodeCval, {"splits": 4}, ("x",), D_HID),
    "mlp_list4": (MultiMLPList, {"n_layers": 4}, ("x", "y"), D_HID),
    "transformer_like": (TransformerLike, {}, ("x",), 16),
    "skip_two": (SkipTwo, {}, ("x",), 128),
    "late_input": (LateInput, {}, ("x", "y"), 128),
    "param_three": (ParamThreeStages, {}, ("x",), 128),
    "no_markers": (NoMarkers, {}, ("x",), 128),
}

NAMES = tuple(_MODELS)


def make(name, seed=0):
    """Builds model `name` with weights from torch.manual_seed(seed), in eval
    mode."""
    cls, kwargs, _, _ = _MODELS[name]
    torch.manual_seed(seed)
    return cls(**kwargs).eval()


def example_inputs(name, batch=16, seed=1234):
    """{input name: float32 tensor [batch, d]} for model `name`, seeded."""
    _, _, input_names, d = _MODELS[name]
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(batch, d, generator=generator) for n in input_names}
