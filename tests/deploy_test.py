"""Checks that the Kubernetes manifests agree with each other and with the
binaries' flags: the coordinator's static stage list names every
StatefulSet pod on the stage servers' port, probes use gRPC health on the
ports the servers listen on, and the entry point knows every role used."""
import os
import re
import unittest

import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


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


if __name__ == "__main__":
    unittest.main()
