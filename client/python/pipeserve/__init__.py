"""pipeserve's Python package: export PyTorch models for pipelined serving,
and talk to a pipeserve server.

Usage:

    import torch
    import pipeserve

    class Model(torch.nn.Module):
        ...
        def forward(self, x):
            x = self.block0(x)
            pipeserve.pipe_split()      # cut the pipeline here
            return self.block1(x)

    info = pipeserve.export(model.eval(), (torch.randn(16, 512),), "m.psm")
    graph, tensors = pipeserve.load_model("m.psm")   # verified read-back

    client = pipeserve.Client("localhost:8001")     # see client.py
    client.upload("m", "m.psm")
    (y,) = client.infer("m", [x])                   # numpy float32 arrays

Names are imported lazily, so `import pipeserve` does not pull in torch until
an export name is used (a serving client only needs the protos, grpcio and
numpy).
"""

import importlib

_EXPORTS = {
    "pipe_split": "exporter",
    "SplitPoint": "exporter",
    "export": "exporter",
    "ExportInfo": "exporter",
    "ExportError": "exporter",
    "load_model": "model_file",
    "ModelFormatError": "model_file",
    "load_proto": "_proto",
    "Client": "client",
    "ServerError": "client",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeserve' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
