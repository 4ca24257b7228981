"""No arrow back up between the layers.

graph/ (shapes, dtypes, op schemas, the validator) is the bottom layer:
its files include only graph/, proto/, common/ and Abseil headers. The
runtime (runtime/, runtime/cpu, runtime/cuda) sits on it and includes no
header of the partitioner, the servers or the client. Tests are exempt
(they may use the partitioner's GraphBuilder to make graphs).
"""
import os
import re
import unittest

INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def sources(top):
    """The non-test C++ sources under `top` in the runfiles."""
    root = os.path.join(os.environ["TEST_SRCDIR"], os.environ["TEST_WORKSPACE"])
    out = []
    for dirpath, _, files in os.walk(os.path.join(root, top)):
        for f in files:
            if f.endswith((".h", ".cc", ".cu")) and not f.endswith("_test.cc"):
                path = os.path.join(dirpath, f)
                out.append((os.path.relpath(path, root), open(path).read()))
    return out


class LayeringTest(unittest.TestCase):
    def check(self, top, allowed=None, forbidden=()):
        files = sources(top)
        self.assertGreater(len(files), 3, f"no sources of {top}/ in the runfiles")
        bad = []
        for path, text in files:
            for inc in INCLUDE.findall(text):
                if inc.startswith(tuple(forbidden)) or (
                        allowed is not None and not inc.startswith(tuple(allowed))):
                    bad.append(f"{path} includes {inc}")
        self.assertEqual(bad, [], f"{top}/ reaches above its layer")

    def test_the_graph_layer_includes_nothing_above_it(self):
        self.check("graph", allowed=("graph/", "proto/", "common/", "absl/"))

    def test_the_runtime_includes_no_partitioner_server_or_client_header(self):
        self.check("runtime", forbidden=("partitioner/", "server/", "client/"))

    def test_the_checker_sees_a_violation(self):
        self.assertEqual(INCLUDE.findall('#include "partitioner/partition.h"\n'),
                         ["partitioner/partition.h"])


if __name__ == "__main__":
    unittest.main()
