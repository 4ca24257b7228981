"""cc_proto: C++ code for one .proto, made by Debian's protoc (and, with
grpc = True, grpc_cpp_plugin), linked against the system libraries.

Protos import each other by file name (`import "model.proto";`) with the
package folder as protoc's include root, the same root the Python package
uses; C++ code still includes "proto/model.pb.h"."""

def cc_proto(name, src, deps = [], grpc = False):
    base = src[:-len(".proto")]
    pkg = native.package_name()
    outs = [base + ".pb.h", base + ".pb.cc"]
    cmd = "protoc -I" + pkg + " --cpp_out=$(GENDIR)/" + pkg + " "
    if grpc:
        outs += [base + ".grpc.pb.h", base + ".grpc.pb.cc"]
        cmd += "--grpc_out=$(GENDIR)/" + pkg + " --plugin=protoc-gen-grpc=/usr/bin/grpc_cpp_plugin "
    native.genrule(
        name = name + "_gen",
        srcs = [src] + [d + "_srcs" for d in deps],
        outs = outs,
        cmd = cmd + pkg + "/" + src,
    )
    native.filegroup(name = name + "_srcs", srcs = [src])
    native.cc_library(
        name = name + "_cc_proto",
        srcs = [o for o in outs if o.endswith(".cc")],
        hdrs = [o for o in outs if o.endswith(".h")],
        # Generated code includes its siblings by file name.
        includes = ["."],
        deps = [d + "_cc_proto" for d in deps] + [
            "//third_party:protobuf",
        ] + (["//third_party:grpc"] if grpc else []),
    )
