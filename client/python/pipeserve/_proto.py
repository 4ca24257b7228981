"""Python classes for pipeserve's .proto files, generated on first use.

The .proto files under `<repo>/proto/` are the only source of truth; nothing
generated is checked in. `load_proto` runs Debian's `protoc` once per proto
content and caches the generated modules in a directory named by a hash of the
proto files' bytes, so every later call (and every later process) imports the
cached code.

Usage:

    from pipeserve._proto import load_proto

    model_pb2 = load_proto("model.proto")
    graph = model_pb2.Graph()

    # A service proto (with its imports) and its gRPC stubs:
    service_pb2, service_pb2_grpc = load_proto("service.proto", grpc=True)

Cache location: `$XDG_CACHE_HOME` (or `~/.cache`), then the system temp dir,
as `pipeserve-proto-<hash>/`. Code is generated into a temporary sibling
directory and renamed into place, so concurrent processes (parallel test runs)
never see a half-written cache entry. If no cache root is writable the code is
generated into a fresh private temp dir.
"""

import hashlib
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading

PROTOC = "/usr/bin/protoc"
GRPC_PYTHON_PLUGIN = "/usr/bin/grpc_python_plugin"

# client/python/pipeserve/_proto.py -> <repo>/proto. Lexical on purpose
# (abspath, not realpath): under Bazel this file is a symlink in the runfiles
# tree and the protos beside it are the ones the target depends on.
_PROTO_DIR = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                 "proto"))

_IMPORT_RE = re.compile(r'^\s*import\s+(?:public\s+|weak\s+)?"([^"]+)"\s*;',
                        re.MULTILINE)

_lock = threading.Lock()
_loaded = {}  # (proto name, grpc) -> module or (module, grpc module)


def proto_dir():
    """The directory holding pipeserve's .proto files."""
    return _PROTO_DIR


def load_proto(name, grpc=False):
    """Imports the Python code of `proto_dir()/name` and returns the module.

    Args:
      name: a .proto file name relative to proto_dir(), e.g. "model.proto".
      grpc: also generate gRPC stubs and return (pb2 module, pb2_grpc module).

    Raises:
      FileNotFoundError: the .proto (or one it imports) does not exist.
      RuntimeError: protoc failed; the message holds its stderr.
      ImportError: a different module of the same name is already imported.
    """
    key = (name, bool(grpc))
    with _lock:
        if key not in _loaded:
            _loaded[key] = _load(name, bool(grpc))
        return _loaded[key]


def _load(name, grpc):
    files = _import_closure(name)
    out_dir = _generate(files, grpc)
    if out_dir not in sys.path:
        sys.path.insert(0, out_dir)
    stem = name[:-len(".proto")].replace("/", ".")
    pb2 = _import(stem + "_pb2", out_dir)
    if not grpc:
        return pb2
    return pb2, _import(stem + "_pb2_grpc", out_dir)


def _import(module_name, out_dir):
    module = importlib.import_module(module_name)
    # A module of the same name imported earlier from somewhere else would
    # shadow ours; the same module from another pipeserve cache entry (the
    # same proto imported by two loaded protos) is fine.
    parent = os.path.basename(os.path.dirname(getattr(module, "__file__", "")))
    if not parent.startswith("pipeserve-proto-"):
        raise ImportError(f"{module_name} is already imported from "
                          f"{getattr(module, '__file__', '?')}, not from {out_dir}")
    return module


def _import_closure(name):
    """`name` and every .proto it imports (transitively) from proto_dir(),
    sorted. Well-known types (google/protobuf/...) come with the runtime."""
    seen = set()
    stack = [name]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        with open(os.path.join(_PROTO_DIR, current), encoding="utf-8") as f:
            text = f.read()
        for dep in _IMPORT_RE.findall(text):
            if not dep.startswith("google/protobuf/"):
                stack.append(dep)
    return sorted(seen)


def _cache_key(files, grpc):
    h = hashlib.sha256()
    for tool in [PROTOC] + ([GRPC_PYTHON_PLUGIN] if grpc else []):
        st = os.stat(tool)  # a protoc upgrade must not reuse old code
        h.update(f"{tool}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    h.update(b"grpc\0" if grpc else b"pb2\0")
    for f in files:
        h.update(f.encode() + b"\0")
        with open(os.path.join(_PROTO_DIR, f), "rb") as fp:
            h.update(fp.read())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _cache_roots():
    xdg = os.environ.get("XDG_CACHE_HOME")
    roots = [xdg] if xdg else []
    roots.append(os.path.join(os.path.expanduser("~"), ".cache"))
    roots.append(tempfile.gettempdir())
    return roots


def _generate(files, grpc):
    """Returns a directory holding the generated code of `files`."""
    final_name = "pipeserve-proto-" + _cache_key(files, grpc)
    for root in _cache_roots():
        final = os.path.join(root, final_name)
        if os.path.isdir(final):
            return final
        try:
            os.makedirs(root, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".tmp-" + final_name + "-", dir=root)
        except OSError:
            continue  # not writable: try the next root
        try:
            _run_protoc(files, grpc, tmp)
            try:
                os.rename(tmp, final)  # atomic; fails if another process won
            except OSError:
                if not os.path.isdir(final):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final
    # No cache root is writable: a private, unshared directory.
    tmp = tempfile.mkdtemp(prefix=final_name + "-")
    _run_protoc(files, grpc, tmp)
    return tmp


def _run_protoc(files, grpc, out_dir):
    cmd = [PROTOC, "-I" + _PROTO_DIR, "--python_out=" + out_dir]
    if grpc:
        cmd += ["--grpc_python_out=" + out_dir,
                "--plugin=protoc-gen-grpc_python=" + GRPC_PYTHON_PLUGIN]
    cmd += files
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed ({' '.join(cmd)}): "
                           f"{result.stderr.strip()}")
