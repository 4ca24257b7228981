"""pipeserve_fuzz_target: one libFuzzer target and its corpus test.

NAME is a cc_binary: under `--config=fuzz` (clang, libFuzzer, ASan and
UBSan; see .bazelrc and tools/fuzz.sh) a fuzzer; otherwise a program that
runs LLVMFuzzerTestOneInput over the files it is given. NAME_corpus_test
runs it over fuzz/corpus/NAME on every `bazel test //...`, so the seeds and
every crash ever found stay fixed.
"""

def pipeserve_fuzz_target(name, deps):
    native.cc_binary(
        name = name,
        testonly = True,
        srcs = [name + ".cc"],
        deps = deps + select({
            ":fuzzing": [],
            "//conditions:default": [":corpus_main"],
        }),
        linkopts = select({
            ":fuzzing": ["-fsanitize=fuzzer"],
            "//conditions:default": [],
        }),
    )
    native.sh_test(
        name = name + "_corpus_test",
        size = "small",
        srcs = ["run_corpus.sh"],
        args = ["$(location :%s)" % name, "fuzz/corpus/" + name],
        data = [":" + name] + native.glob(["corpus/%s/**" % name]),
    )
