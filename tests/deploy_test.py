"""Checks that the Kubernetes manifests agree with each other and with the
binaries' flags: the coordinator's static stage list names every
StatefulSet pod on the stage servers' port, probes use gRPC health on the
ports the servers listen on, the entry point knows every role used, and
every object passes the Kubernetes API's schemas (npm kubernetes-models,
installed by tools/bootstrap.sh)."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import unittest

import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MANIFESTS = ("deploy/k8s/stages.yaml", "deploy/k8s/coordinator.yaml")


def load(path):
    with open(os.path.join(ROOT, path)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def find(docs, kind, name=None):
    for d in docs:
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name):
            return d
    raise AssertionError(f"no {kind} {name or ''}")


def flag(args, name):
    for a in args:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    raise AssertionError(f"no --{name} in {args}")


class DeployTest(unittest.TestCase):
    def setUp(self):
        self.stages = load("deploy/k8s/stages.yaml")
        self.coord = load("deploy/k8s/coordinator.yaml")

    def test_static_stage_list_names_every_statefulset_pod(self):
        sts = find(self.stages, "StatefulSet")
        svc = find(self.stages, "Service")
        self.assertEqual(svc["spec"]["clusterIP"], "None",
                         "the stage Service must be headless for per-pod DNS")
        self.assertEqual(sts["spec"]["serviceName"], svc["metadata"]["name"])
        port = svc["spec"]["ports"][0]["port"]
        container = sts["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(flag(container["args"], "port"), str(port))
        args = find(self.coord, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
        self.assertEqual(flag(args, "launcher"), "static")
        expected = [f"{sts['metadata']['name']}-{i}.{svc['metadata']['name']}:{port}"
                    for i in range(sts["spec"]["replicas"])]
        self.assertEqual(flag(args, "stage_servers").split(","), expected)

    def test_probes_use_grpc_health_on_the_serving_ports(self):
        sts = find(self.stages, "StatefulSet")
        c = sts["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(c["readinessProbe"]["grpc"]["port"], int(flag(c["args"], "port")))
        d = find(self.coord, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(d["readinessProbe"]["grpc"]["port"], int(flag(d["args"], "port")))
        self.assertEqual(find(self.coord, "Service")["spec"]["ports"][0]["targetPort"],
                         int(flag(d["args"], "port")))

    def test_prometheus_scrapes_the_metrics_port(self):
        tmpl = find(self.coord, "Deployment")["spec"]["template"]
        port = flag(tmpl["spec"]["containers"][0]["args"], "metrics_port")
        self.assertEqual(tmpl["metadata"]["annotations"]["prometheus.io/port"], port)
        ports = {p["name"]: p["targetPort"] for p in find(self.coord, "Service")["spec"]["ports"]}
        self.assertEqual(ports["metrics"], int(port))

    def test_model_repository_is_on_the_persistent_volume(self):
        spec = find(self.coord, "Deployment")["spec"]["template"]["spec"]
        mount = spec["containers"][0]["volumeMounts"][0]
        self.assertEqual(flag(spec["containers"][0]["args"], "repository"), mount["mountPath"])
        claim = spec["volumes"][0]["persistentVolumeClaim"]["claimName"]
        find(self.coord, "PersistentVolumeClaim", claim)

    def test_entrypoint_knows_every_role_the_manifests_use(self):
        with open(os.path.join(ROOT, "deploy/entrypoint.sh")) as f:
            roles = re.search(r"^\s*([a-z_|]+)\) exec", f.read(), re.M).group(1).split("|")
        for docs, kind in ((self.stages, "StatefulSet"), (self.coord, "Deployment")):
            role = find(docs, kind)["spec"]["template"]["spec"]["containers"][0]["args"][0]
            self.assertIn(role, roles)


def node_modules():
    """Where tools/bootstrap.sh put kubernetes-models."""
    lock = os.path.join(ROOT, "tests/k8s_schema/package-lock.json")
    with open(lock, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    base = os.environ.get("PIPESERVE_NODE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "pipeserve-node")
    return os.path.join(base, digest)


class SchemaTest(unittest.TestCase):
    """Every manifest object against the Kubernetes API's schemas."""

    def validate(self, named_docs):
        node = shutil.which("node") or shutil.which("nodejs")
        self.assertIsNotNone(node, "node not found: run tools/bootstrap.sh")
        modules = node_modules()
        self.assertTrue(os.path.isfile(os.path.join(modules, ".complete")),
                        f"kubernetes-models is not installed in {modules}: run tools/bootstrap.sh")
        docs = [{"name": n, "doc": d} for n, d in named_docs]
        run = subprocess.run(
            [node, os.path.join(ROOT, "tests/k8s_schema/validate.js"),
             os.path.join(modules, "node_modules")],
            input=json.dumps(docs), capture_output=True, text=True, timeout=120)
        self.assertIn(run.returncode, (0, 1), run.stderr)
        return run.returncode, run.stdout.splitlines()

    def test_manifests_match_the_kubernetes_schemas(self):
        named = []
        for path in MANIFESTS:
            for i, doc in enumerate(load(path)):
                named.append((f"{path} #{i} {doc.get('kind')} "
                              f"{doc.get('metadata', {}).get('name')}", doc))
        self.assertEqual(len(named), 5)
        rc, problems = self.validate(named)
        self.assertEqual(problems, [])
        self.assertEqual(rc, 0)

    def test_the_schema_check_catches_mistakes(self):
        # So a broken validator cannot pass the manifests silently.
        doc = find(load("deploy/k8s/coordinator.yaml"), "Deployment")
        misspelt = json.loads(json.dumps(doc))
        c = misspelt["spec"]["template"]["spec"]["containers"][0]
        c["readinesProbe"] = c.pop("readinessProbe")
        c["volumeMounts"][0]["readonly"] = True
        wrong_type = json.loads(json.dumps(doc))
        wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8001"
        missing = json.loads(json.dumps(doc))
        del missing["spec"]["selector"]
        rc, problems = self.validate([("misspelt", misspelt), ("wrong_type", wrong_type),
                                      ("missing", missing)])
        self.assertEqual(rc, 1)
        text = "\n".join(problems)
        self.assertIn('misspelt: /spec/template/spec/containers/0: unknown field "readinesProbe"',
                      text)
        self.assertIn('unknown field "readonly"', text)
        self.assertRegex(text, r"wrong_type: .*containerPort must be integer")
        self.assertRegex(text, r"missing: .*must have required property '?selector'?")


if __name__ == "__main__":
    unittest.main()
