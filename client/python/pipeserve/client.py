"""A Python client of a pipeserve coordinator, over grpcio.

Model upload and plans go to pipeserve.ModelService; inference, metadata and
readiness use the KServe v2 / Open Inference Protocol
(inference.GRPCInferenceService), so the same server also answers Triton and
KServe clients. Stubs are generated from `<repo>/proto` on first use (see
`_proto.py`); nothing generated is checked in.

Usage:

    import numpy as np
    import pipeserve

    client = pipeserve.Client("localhost:8001")
    info = client.upload("example", "example.psm", num_stages=4,
                         progress=lambda sent, total: print(sent, total))
    # {'name': 'example', 'bytes': 8392960, 'num_stages': 4}
    x = np.random.randn(16, 512).astype(np.float32)
    y = np.random.randn(16, 512).astype(np.float32)
    (out,) = client.infer("example", [x, y])        # in model input order
    (out,) = client.infer("example", {"x": x, "y": y})
    print(client.models())
    print(client.plan("example").stage_servers)

Every server error is raised as `pipeserve.ServerError`, with `.code` the
gRPC status code's name ("NOT_FOUND") and `.message` the server's message.
Local problems raise the usual Python exceptions (FileNotFoundError for a
missing model file, ValueError for an unusable input).
"""

import json
import math
import os
import zlib

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from . import _wire
from ._proto import load_proto

# Bytes of file data per Upload message (as the C++ client).
UPLOAD_CHUNK_BYTES = 1 << 20

# Upload's deadline adds one second per this many bytes of file.
_UPLOAD_BYTES_PER_SECOND = 16 << 20

_SPLIT_POINTS = {"BEGINNING": 1, "END": 2}



def _balance_and_cuts(options, balance, split_spec):
    """Sets UploadOptions' balance (None, "measured" or "estimated") and
    split_spec ({module FQN: SplitPoint})."""
    balances = {None: 0, "measured": 1, "estimated": 2}
    if balance not in balances:
        raise ValueError(f"balance must be 'measured' or 'estimated', got {balance!r}")
    options.balance = balances[balance]
    for module, point in (split_spec or {}).items():
        options.split_spec.add(module=module, point=_split_point(point))


def _upload_requests(ps, f, path, total, first, progress, failure):
    """The UploadRequests of the `total` bytes of file f: the first is
    `first` (the model's name and options) with its chunk, the last carries
    the size and CRC-32. An error reading the file goes to `failure`, for
    the caller to raise after the call."""
    sent, crc, request = 0, 0, first
    try:
        while request is first or sent < total:
            chunk = f.read(min(UPLOAD_CHUNK_BYTES, total - sent))
            if len(chunk) != min(UPLOAD_CHUNK_BYTES, total - sent):
                raise OSError(f"model file {path!r}: read "
                              f"{sent + len(chunk)} of {total} bytes "
                              "(did it change during the upload?)")
            crc = zlib.crc32(chunk, crc)
            sent += len(chunk)
            if request is None:
                request = ps.UploadRequest()
            request.data = chunk
            if sent == total:
                request.last = True
                request.total_bytes = total
                request.crc32 = crc
            yield request
            request = None
            if progress is not None:
                progress(sent, total)
    except Exception as e:  # noqa: BLE001 (re-raised by upload)
        failure.append(e)
        raise

class ServerError(Exception):
    """A gRPC call failed: `.code` is the status code name ("NOT_FOUND",
    "UNAVAILABLE", ...), `.message` the server's message."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _server_error(e):
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else None
    return ServerError(code.name if code is not None else "UNKNOWN",
                       details if details is not None else str(e))


def _retry_service_config(attempts):
    """gRPC's retry policy for the calls that are safe to repeat: UNAVAILABLE
    (a coordinator restarting, a connection lost) is tried again, with
    backoff from 100 ms to 2 s, within each call's deadline."""
    names = [{"service": "inference.GRPCInferenceService", "method": m}
             for m in ("ModelInfer", "ServerLive", "ServerReady", "ModelReady",
                       "ServerMetadata", "ModelMetadata", "RepositoryIndex")]
    names += [{"service": "pipeserve.ModelService", "method": m}
              for m in ("GetPlan", "ListModels")]
    names.append({"service": "grpc.health.v1.Health", "method": "Check"})
    return json.dumps({"methodConfig": [{
        "name": names,
        "retryPolicy": {
            "maxAttempts": min(attempts, 5),
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]})


class Client:
    """A client of the coordinator at `address` ("host:port").

    Args:
      address: the coordinator's gRPC address.
      timeout: deadline of each call in seconds (upload adds time for the
        file's size; infer takes its own).
      max_message_bytes: the largest message sent or received; an inference
        request or response carries all its tensors in one message.
      token: bearer token sent with every call (servers with --auth_tokens:
        scope "infer" for inference, "admin" for upload, unload, plan and
        models). Default: $PIPESERVE_TOKEN, if set.
      tls_ca: path of the PEM CA the server's certificate must chain to;
        setting it turns TLS on (None: plaintext).
      tls_cert, tls_key: paths of a client certificate and key, for servers
        that require one.
      tls_server_name: the name the server's certificate must carry, when it
        is not the host in `address`.
      retry_attempts: attempts at an idempotent call (inference, metadata,
        readiness, plan, list) that fails with UNAVAILABLE, with backoff
        from 100 ms to 2 s within the call's deadline (gRPC allows at most
        5); 1 turns retries off.

    The connection is made lazily: an unreachable server shows up as a
    ServerError with code "UNAVAILABLE" from the first call. Safe to use from
    several threads. Use as a context manager, or call close().
    """

    def __init__(self, address="localhost:8001", timeout=60.0,
                 max_message_bytes=1 << 30, token=None, tls_ca=None,
                 tls_cert=None, tls_key=None, tls_server_name=None,
                 retry_attempts=5):
        self.address = address
        self.timeout = timeout
        self._pb, pb_grpc = load_proto("grpc_service.proto", grpc=True)
        self._ps, ps_grpc = load_proto("pipeserve_service.proto", grpc=True)
        if token is None:
            token = os.environ.get("PIPESERVE_TOKEN")
        self._metadata = ((("authorization", f"Bearer {token.strip()}"),)
                          if token else None)
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if retry_attempts > 1:
            options += [
                ("grpc.service_config", _retry_service_config(retry_attempts)),
                # Requests are kept for their retries while in flight;
                # gRPC's default (256 KiB) would leave most unretried.
                ("grpc.per_rpc_retry_buffer_size",
                 min(max_message_bytes, 256 << 20)),
            ]
        if tls_ca or tls_cert:
            def read(path):
                if path is None:
                    return None
                with open(path, "rb") as f:
                    return f.read()
            credentials = grpc.ssl_channel_credentials(
                root_certificates=read(tls_ca), private_key=read(tls_key),
                certificate_chain=read(tls_cert))
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override",
                                tls_server_name))
            self._channel = grpc.secure_channel(address, credentials,
                                                options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._inference = pb_grpc.GRPCInferenceServiceStub(self._channel)
        # ModelInfer as raw bytes both ways: tensor bytes skip protobuf's
        # copies (_wire.py).
        self._model_infer = self._channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer")
        self._models = ps_grpc.ModelServiceStub(self._channel)
        self._generation = ps_grpc.GenerationServiceStub(self._channel)

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- pipeserve.ModelService ----------------------------------------------

    def upload(self, name, path, num_stages=None, microbatches=None,
               split_spec=None, progress=None, replicas=None,
               max_batch_rows=None, max_queue_delay_us=None, balance=None,
               link_gb_per_s=None, tokenizer=None):
        """Streams the model file `path` to the server as model `name`.

        The file is read and sent in 1 MiB chunks (it may be larger than
        memory); the call returns once the server has checked, partitioned
        and deployed the model.

        Args:
          num_stages: stages for automatic cutting of a model without cut
            points (None: as the model says).
          microbatches: microbatches per request (None: the server default).
          replicas: replicas of every stage (None: the server default); a
            model of S stages then runs on replicas x S stage servers, and
            survives one dying without waiting for it.
          max_batch_rows: dynamic batching: while the model is busy,
            concurrent requests with fewer rows are merged into requests of
            up to this many rows, and stages compute a request's queued
            microbatches together up to it (None: the server default; -1:
            never).
          max_queue_delay_us: how long a request waits for others to merge
            with (None: the server default).
          split_spec: {module FQN: SplitPoint, 1/2 or "BEGINNING"/"END"},
            overriding the model's own split_spec.
          balance: how num_stages cuts are balanced: "measured" (node times
            measured on the server) or "estimated" (FLOPs + parameter
            bytes); None: measured where the server can.
          link_gb_per_s: link bandwidth between stages that measured
            balancing assumes (None: the server default).
          tokenizer: for the text APIs (/v1/completions, Triton generate's
            text_input) of a model exported for generation, stored with it:
            {"gpt2_vocab": "vocab.json", "gpt2_merges": "merges.txt"} or
            {"sentencepiece": "tokenizer.model"}, each path a file, plus
            optionally "stop_token_ids": [...] (besides the tokenizer's end
            of text) and "chat_template": {"roles": {"user":
            "<|user|>\\n{content}</s>\\n", ...}, "prefix": "...",
            "generation_prompt": "<|assistant|>\\n"} for
            /v1/chat/completions.
          progress: called as progress(sent_bytes, total_bytes) after each
            chunk.

        Returns:
          {"name": ..., "bytes": bytes received, "num_stages": ...}; with
          "waiting": why, and num_stages 0, when the model is stored but
          waits for stage servers (a coordinator with --launcher=dns whose
          DNS name lists too few): it deploys as soon as they answer.
        """
        options = self._ps.UploadOptions(num_stages=num_stages or 0,
                                         microbatches=microbatches or 0,
                                         replicas=replicas or 0,
                                         max_batch_rows=max_batch_rows or 0,
                                         max_queue_delay_us=max_queue_delay_us or 0,
                                         link_gb_per_s=link_gb_per_s or 0)
        _balance_and_cuts(options, balance, split_spec)
        if tokenizer is not None:
            _tokenizer_spec(tokenizer, options.tokenizer)
        f = open(path, "rb")  # FileNotFoundError names the path
        failure = []  # an error reading the file, raised after the call
        with f:
            total = os.fstat(f.fileno()).st_size
            timeout = self.timeout + total / _UPLOAD_BYTES_PER_SECOND
            first = self._ps.UploadRequest(name=name)
            first.options.CopyFrom(options)
            requests = _upload_requests(self._ps, f, path, total, first, progress, failure)
            try:
                response = self._models.Upload(requests, timeout=timeout,
                                               metadata=self._metadata)
            except grpc.RpcError as e:
                if failure:
                    raise failure[0] from None
                raise _server_error(e) from None
        out = {"name": response.name, "bytes": response.bytes,
               "num_stages": response.num_stages}
        if response.waiting:  # stored; deploys once its stage servers answer
            out["waiting"] = response.waiting
        return out

    def unload(self, name):
        """Stops serving model `name`, unloads its stages and removes it
        from the server's repository (ServerError NOT_FOUND if unknown)."""
        self._call(self._models.Unload, self._ps.UnloadRequest(name=name))

    def plan(self, name):
        """The GetPlanResponse of model `name`: .plan (pipeserve.Plan),
        .stage_servers, .microbatches, .state."""
        return self._call(self._models.GetPlan,
                          self._ps.GetPlanRequest(name=name))

    def models(self):
        """Every model on the server, as dicts with name, state ("READY",
        "LOADING" or "UNAVAILABLE"), num_stages, bytes and reason."""
        response = self._call(self._models.ListModels,
                              self._ps.ListModelsRequest())
        return [{"name": m.name, "state": m.state, "num_stages": m.num_stages,
                 "bytes": m.bytes, "reason": m.reason}
                for m in response.models]

    # -- pipeserve.GenerationService -----------------------------------------

    def generate(self, name, prompt, max_tokens=16, temperature=0.0, top_k=0,
                 top_p=1.0, repetition_penalty=1.0, frequency_penalty=0.0,
                 stop_token_ids=(), seed=None, timeout=None):
        """Generates tokens from model `name` (exported with
        generation=True), yielding each token id as the server samples it.

        `prompt` is a list of token ids. temperature 0 is greedy; a `seed`
        makes sampling reproducible (the same tokens whatever else the
        server is generating). The generator's `finish_reason` attribute is
        set at the end ("stop" or "length"). Closing the generator early
        (or breaking out of the loop) cancels the request, and the server
        frees its cache within a step.

        Raises:
          ServerError: INVALID_ARGUMENT, RESOURCE_EXHAUSTED (naming the
            limit), FAILED_PRECONDITION (not a generation model), ...
        """
        request = self._ps.GenerateRequest(
            model=name, prompt=[int(t) for t in prompt], max_tokens=max_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
            stop_token_ids=[int(t) for t in stop_token_ids])
        if seed is not None:
            request.seed = seed
        return _TokenStream(self._generation.Generate(
            request, timeout=self.timeout if timeout is None else timeout,
            metadata=self._metadata))

    # -- KServe v2 ------------------------------------------------------------

    def infer(self, name, inputs, timeout=None, trace=None):
        """Runs model `name` and returns its outputs as float32 arrays, in
        the model's output order.

        Args:
          inputs: a list of arrays in the model's input order (the order is
            read from the model's metadata, one more call), or a dict
            {input name: array}. Anything np.asarray takes (numpy arrays,
            CPU torch tensors, nested lists) is sent C-contiguous in its
            dtype: float32 as FP32, float16 FP16, int64 INT64, int32 INT32,
            bool BOOL; float64 is sent as FP32. A torch.bfloat16 tensor is
            sent as BF16. BF16 outputs come back as float32 arrays, the
            others in their dtype.
          timeout: seconds (None or 0: the client's timeout).
          trace: a file path: the request asks for its timeline (every
            microbatch's transfer, queue and compute on every stage) and it
            is written there as Chrome trace JSON, for ui.perfetto.dev.
        """
        if isinstance(inputs, dict):
            named = list(inputs.items())
        else:
            inputs = list(inputs)
            names = [t.name for t in self.metadata(name).inputs]
            if len(inputs) != len(names):
                raise ValueError(f"model {name!r} takes {len(names)} inputs "
                                 f"({', '.join(names)}), got {len(inputs)}")
            named = list(zip(names, inputs))
        request = self._pb.ModelInferRequest(model_name=name)
        arrays = []
        for input_name, value in named:
            # Row-major, little-endian, as raw_input_contents wants.
            datatype, array = _to_wire(value)
            request.inputs.add(name=input_name, datatype=datatype,
                               shape=array.shape)
            arrays.append(array)
        if trace is not None:
            request.parameters["trace"].bool_param = True
        data = self._call(self._model_infer,
                          _wire.encode_request(request.SerializeToString(), arrays),
                          timeout=timeout or None)
        try:
            rest, raws = _wire.split_response(data)
            response = self._pb.ModelInferResponse.FromString(rest)
        except (_wire.MalformedMessage, DecodeError) as e:
            raise ServerError("INTERNAL", f"malformed response: {e}") from None
        if trace is not None:
            if "trace" not in response.parameters:
                raise RuntimeError("the server sent no timeline for trace=")
            with open(trace, "w") as f:
                f.write(response.parameters["trace"].string_param)
        return _outputs(response, data, raws)

    def metadata(self, name):
        """The ModelMetadataResponse of model `name`: .inputs and .outputs,
        each with .name, .datatype and .shape (-1: the batch dimension)."""
        return self._call(self._inference.ModelMetadata,
                          self._pb.ModelMetadataRequest(name=name))

    def model_ready(self, name):
        return self._call(self._inference.ModelReady,
                          self._pb.ModelReadyRequest(name=name)).ready

    def health(self):
        """True when the server is live and ready. False also when it cannot
        be reached (UNAVAILABLE, or no answer within the timeout), so this
        can be polled while a server starts; other errors raise."""
        try:
            live = self._call(self._inference.ServerLive,
                              self._pb.ServerLiveRequest()).live
            return live and self._call(self._inference.ServerReady,
                                       self._pb.ServerReadyRequest()).ready
        except ServerError as e:
            if e.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                return False
            raise

    # -------------------------------------------------------------------------

    def _call(self, method, request, timeout=None):
        try:
            return method(request,
                          timeout=self.timeout if timeout is None else timeout,
                          metadata=self._metadata)
        except grpc.RpcError as e:
            raise _server_error(e) from None


class _TokenStream:
    """Iterates over a Generate call's token ids; `finish_reason` is set
    once the last has come, `close()` cancels the call."""

    def __init__(self, call):
        self._call = call
        self.finish_reason = None

    def __iter__(self):
        return self

    def __next__(self):
        try:
            response = next(self._call)
        except grpc.RpcError as e:
            raise _server_error(e) from None
        if response.finish_reason:
            self.finish_reason = response.finish_reason
        return response.token_id

    def close(self):
        self._call.cancel()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self._call.cancel()


def _read(path):
    with open(path, "rb") as f:  # FileNotFoundError names the path
        return f.read()


def _tokenizer_spec(tokenizer, spec):
    """Fills TokenizerSpec `spec` from upload()'s `tokenizer` dict."""
    known = {"gpt2_vocab", "gpt2_merges", "sentencepiece", "stop_token_ids",
             "chat_template"}
    unknown = set(tokenizer) - known
    if unknown:
        raise ValueError(f"tokenizer: unknown keys {sorted(unknown)} "
                         f"(it takes {sorted(known)})")
    if "sentencepiece" in tokenizer:
        spec.sentencepiece_model = _read(tokenizer["sentencepiece"])
    elif "gpt2_vocab" in tokenizer and "gpt2_merges" in tokenizer:
        spec.gpt2_bpe.vocab_json = _read(tokenizer["gpt2_vocab"])
        spec.gpt2_bpe.merges = _read(tokenizer["gpt2_merges"])
    else:
        raise ValueError("tokenizer: give \"sentencepiece\" (a .model file) or "
                         "\"gpt2_vocab\" and \"gpt2_merges\" (vocab.json, merges.txt)")
    spec.stop_token_ids.extend(tokenizer.get("stop_token_ids", []))
    chat = tokenizer.get("chat_template")
    if chat is not None:
        spec.chat_template.roles.update(chat.get("roles", {}))
        spec.chat_template.prefix = chat.get("prefix", "")
        spec.chat_template.generation_prompt = chat.get("generation_prompt", "")


def _split_point(point):
    if isinstance(point, str):
        if point.upper() not in _SPLIT_POINTS:
            raise ValueError(f"split point {point!r}: expected BEGINNING or "
                             "END")
        return _SPLIT_POINTS[point.upper()]
    if int(point) not in _SPLIT_POINTS.values():
        raise ValueError(f"split point {point!r}: expected BEGINNING (1) or "
                         "END (2)")
    return int(point)


_WIRE = {  # numpy dtype -> (KServe datatype, little-endian dtype)
    np.dtype(np.float32): ("FP32", "<f4"),
    np.dtype(np.float64): ("FP32", "<f4"),
    np.dtype(np.float16): ("FP16", "<f2"),
    np.dtype(np.int64): ("INT64", "<i8"),
    np.dtype(np.int32): ("INT32", "<i4"),
    np.dtype(np.bool_): ("BOOL", "?"),
}
_FROM_WIRE = {"FP32": "<f4", "FP16": "<f2", "INT64": "<i8", "INT32": "<i4",
              "BOOL": "?", "BF16": "<u2"}


def _to_wire(value):
    """(KServe datatype, C-contiguous little-endian array) for an input."""
    if type(value).__module__.startswith("torch") and \
            str(getattr(value, "dtype", "")) == "torch.bfloat16":
        import torch  # only when a torch tensor was given
        bits = value.detach().cpu().contiguous().view(torch.int16).numpy()
        return "BF16", np.ascontiguousarray(bits.view("<u2"))
    array = np.asarray(value)
    wire = _WIRE.get(array.dtype)
    if wire is None:
        raise ValueError(f"inputs of dtype {array.dtype} are not supported "
                         "(float32, float16, int64, int32, bool; float64 is "
                         "sent as float32)")
    return wire[0], np.ascontiguousarray(array, dtype=wire[1])


def _outputs(response, data, raw):
    """The outputs of a ModelInferResponse as numpy arrays; ServerError
    with code "INTERNAL" naming the output when the response is malformed.
    `response` is the message without raw_output_contents, `raw` the
    (offset, length) of each of them in `data` (_wire.split_response)."""
    if raw and len(raw) != len(response.outputs):
        raise ServerError("INTERNAL",
                          f"malformed response: {len(response.outputs)} "
                          f"outputs but {len(raw)} raw_output_contents")
    outputs = []
    for i, out in enumerate(response.outputs):
        def bad(what, out=out):
            return ServerError("INTERNAL", f"malformed response: output "
                               f"\"{out.name}\": {what}")
        wire = _FROM_WIRE.get(out.datatype)
        if wire is None:
            raise bad(f"datatype \"{out.datatype}\" is not supported")
        shape = tuple(out.shape)
        if any(d < 0 for d in shape):
            raise bad(f"negative dimension in shape {list(shape)}")
        numel = math.prod(shape)  # exact: np.prod in int64 wraps
        size = np.dtype(wire).itemsize
        if raw:
            offset, length = raw[i]
            if length != size * numel:
                raise bad(f"{length} bytes for shape {list(shape)} "
                          f"({size * numel} expected)")
            try:
                array = np.frombuffer(data, dtype=wire, count=numel,
                                      offset=offset).reshape(shape)
            except ValueError as e:  # a shape numpy cannot hold
                raise bad(f"shape {list(shape)}: {e}") from None
            if out.datatype == "BF16":  # numpy has no bfloat16
                array = (array.astype(np.uint32) << 16).view(np.float32)
            outputs.append(np.array(array, dtype=array.dtype.newbyteorder("=")))
            continue
        elif out.datatype != "FP32":
            raise bad(f"{out.datatype} output without raw_output_contents")
        else:
            values = out.contents.fp32_contents
            if len(values) != numel:
                raise bad(f"{len(values)} fp32_contents for shape "
                          f"{list(shape)}")
            try:
                array = np.asarray(values, dtype=np.float32).reshape(shape)
            except ValueError as e:  # a shape numpy cannot hold
                raise bad(f"shape {list(shape)}: {e}") from None
        # A writable array of native float32, not a view of the message.
        outputs.append(np.array(array, dtype=np.float32))
    return outputs
