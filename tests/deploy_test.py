"""Checks that the Kubernetes manifests, as each kustomize overlay renders
them (`kubectl kustomize deploy/k8s/overlays/<name>`), agree with each
other, with the binaries' flags and with deploy/README.md: the
coordinator's static stage list (from the pipeserve-layout ConfigMap) names
every StatefulSet pod on the stage servers' port; every Service and
container port is a port a server listens on; nothing serves without TLS;
every certificate, key and token path in the args and probes is a file of a
mounted, documented Secret; probes run the CLI's health check over TLS on
the serving ports; the entry point knows every role used; the GPU overlays
ask for a GPU per stage pod and the CPU one for none; and every object
passes the Kubernetes API's schemas (npm kubernetes-models, installed by
tools/bootstrap.sh)."""
import hashlib
import json
import os
import posixpath
import re
import shutil
import subprocess
import tempfile
import unittest

import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OVERLAYS = ("cpu", "gpu", "gpu-replicated")
NAMESPACE = "ml"  # what the downward API gives $(POD_NAMESPACE) here
CLI = "/usr/local/bin/pipeserve"
# Flags naming a certificate, key or token file: the servers' and the CLI's.
FILE_FLAGS = re.compile(r"^--(tls_ca|tls_cert|tls_key|cluster_ca|cluster_cert|cluster_key|"
                        r"auth_tokens|token_file|cluster_token_file)=(.*)$")


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def load(path):
    return [d for d in yaml.safe_load_all(read(path)) if d]


_rendered = {}


def render(overlay):
    """The objects `kubectl kustomize` makes of deploy/k8s/overlays/<overlay>."""
    if overlay not in _rendered:
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise AssertionError("kubectl not found: the tests render the kustomize overlays "
                                 "with `kubectl kustomize` (kubectl 1.32 comes with the machine)")
        # A copy: kustomize does not take the symlinks of Bazel's runfiles.
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(os.path.join(ROOT, "deploy/k8s"), os.path.join(tmp, "k8s"))
            run = subprocess.run([kubectl, "kustomize", os.path.join(tmp, "k8s/overlays", overlay)],
                                 capture_output=True, text=True, timeout=60)
        if run.returncode != 0:
            raise AssertionError(f"kubectl kustomize {overlay}: {run.stderr}")
        _rendered[overlay] = [d for d in yaml.safe_load_all(run.stdout) if d]
    return _rendered[overlay]


def expand(args, env):
    """`args` with $(VAR) replaced from `env`, as the kubelet does."""
    out = []
    for a in args:
        for name in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
            if name not in env:
                raise AssertionError(f"{a}: ${name} is not in the container's environment")
            a = a.replace(f"$({name})", env[name])
        out.append(a)
    return out


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


def has_flag(args, name):
    return any(a.startswith(f"--{name}=") for a in args)


def documented_secrets():
    """{secret name: set of keys} from the `kubectl create secret generic NAME
    --from-file=KEY=PATH ...` commands in deploy/README.md."""
    text = read("deploy/README.md").replace("\\\n", " ")
    secrets = {}
    for line in text.splitlines():
        m = re.search(r"kubectl create secret generic ([a-z0-9-]+)(.*)", line)
        if m:
            keys = re.findall(r"--from-file=([A-Za-z0-9._-]+)=\S+", m.group(2))
            secrets.setdefault(m.group(1), set()).update(keys)
    return secrets


def secret_files(volume):
    """{file name in the mount: (secret name, key)} for a secret or projected
    volume; None for other volumes."""
    sources = []
    if "secret" in volume:
        sources = [volume["secret"]]
    elif "projected" in volume:
        sources = [s["secret"] for s in volume["projected"]["sources"] if "secret" in s]
        if not sources:
            return None
    else:
        return None
    files = {}
    for s in sources:
        name = s["secretName"] if "secretName" in s else s["name"]
        items = s.get("items")
        if items is None:
            # Every key of the Secret becomes a file of the same name.
            for key in documented_secrets().get(name, ()):
                files[key] = (name, key)
        else:
            for item in items:
                files[item["path"]] = (name, item["key"])
    return files


class Workload:
    """The pod template of a Deployment or StatefulSet and its one
    container, its args expanded from its environment (`env`, and `envFrom`
    ConfigMaps found in `docs`)."""

    def __init__(self, doc, docs=()):
        self.doc = doc
        self.name = f"{doc['kind']} {doc['metadata']['name']}"
        self.pod = doc["spec"]["template"]["spec"]
        (self.container,) = self.pod["containers"]
        self.env = {}
        for source in self.container.get("envFrom", []):
            ref = source["configMapRef"]["name"]
            self.env.update(find(docs, "ConfigMap", ref)["data"])
        for e in self.container.get("env", []):
            if "value" in e:
                self.env[e["name"]] = e["value"]
            elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
                self.env[e["name"]] = NAMESPACE
        self.args = expand(self.container["args"], self.env)
        self.volumes = {v["name"]: v for v in self.pod.get("volumes", [])}

    def probes(self):
        return [(kind, self.container[kind])
                for kind in ("readinessProbe", "livenessProbe", "startupProbe")
                if kind in self.container]

    def resolve(self, path):
        """(secret, key) behind a file path in the container, or raise."""
        for mount in self.container.get("volumeMounts", []):
            root = mount["mountPath"].rstrip("/")
            if posixpath.dirname(path) != root:
                continue
            volume = self.volumes.get(mount["name"])
            if volume is None:
                raise AssertionError(f"{self.name}: mount {mount['name']} has no volume")
            files = secret_files(volume)
            if files is None:
                raise AssertionError(f"{self.name}: {path} is on volume {mount['name']}, "
                                     "which is not a Secret")
            if not mount.get("readOnly"):
                raise AssertionError(f"{self.name}: Secret mount {root} is not readOnly")
            name = posixpath.basename(path)
            if name not in files:
                raise AssertionError(f"{self.name}: {path}: volume {mount['name']} has no "
                                     f"file {name} (it has {sorted(files)})")
            return files[name]
        raise AssertionError(f"{self.name}: {path} is under no volume mount")


class OverlayChecks:
    """What every overlay must get right; a DeployTest_<overlay> class per
    overlay runs it (below)."""
    overlay = None

    def setUp(self):
        docs = render(self.overlay)
        self.stages = self.coord = docs
        self.stage = Workload(find(docs, "StatefulSet"), docs)
        self.coordinator = Workload(find(docs, "Deployment"), docs)
        self.workloads = (self.stage, self.coordinator)

    def test_every_port_is_one_a_server_listens_on(self):
        for w in self.workloads:
            listening = {int(flag(w.args, f)) for f in ("port", "http_port", "metrics_port")
                         if has_flag(w.args, f)}
            container = {p["containerPort"] for p in w.container["ports"]}
            self.assertEqual(container, listening, w.name)
            labels = w.doc["spec"]["template"]["metadata"]["labels"]
            for svc in [d for d in self.coord if d["kind"] == "Service"]:
                if svc["spec"]["selector"].items() <= labels.items():
                    for p in svc["spec"]["ports"]:
                        self.assertIn(p.get("targetPort", p["port"]), container,
                                      f"Service {svc['metadata']['name']} port {p['name']}")

    def test_stage_resources_fit_the_overlay(self):
        limits = self.stage.container["resources"].get("limits", {})
        if self.overlay.startswith("gpu"):
            self.assertEqual(limits.get("nvidia.com/gpu"), 1, "one GPU per stage pod")
            tolerated = [t["key"] for t in self.stage.pod.get("tolerations", [])]
            self.assertIn("nvidia.com/gpu", tolerated)
            self.assertIn("nodeAffinity", self.stage.pod["affinity"])
        else:
            self.assertNotIn("nvidia.com/gpu", limits)
        self.assertEqual(flag(self.stage.args, "device"), "auto")

    def test_the_coordinator_finds_every_stage_pod_in_dns(self):
        # The headless Service publishes each ready pod of the StatefulSet
        # as an SRV record of its port name; the dns launcher reads those.
        sts = find(self.stages, "StatefulSet")
        svc = find(self.stages, "Service", "pipeserve-stages")
        self.assertEqual(svc["spec"]["clusterIP"], "None",
                         "the stage Service must be headless for per-pod DNS")
        self.assertNotIn("publishNotReadyAddresses", svc["spec"], "ready pods only")
        self.assertEqual(sts["spec"]["serviceName"], svc["metadata"]["name"])
        (port,) = svc["spec"]["ports"]
        self.assertEqual(flag(self.stage.args, "port"), str(port["port"]))
        self.assertEqual(port.get("protocol", "TCP"), "TCP")
        args = self.coordinator.args
        self.assertEqual(flag(args, "launcher"), "dns")
        self.assertEqual(flag(args, "stage_dns"),
                         f"_{port['name']}._tcp.{svc['metadata']['name']}.{NAMESPACE}"
                         ".svc")
        self.assertFalse(has_flag(args, "stage_servers"))

    def test_stage_pods_hold_every_replica_of_every_stage(self):
        # R replicas of S stages take R x S pods, one per node (so a node
        # lost takes one replica, while the others serve).
        sts = find(self.stages, "StatefulSet")
        replicas = int(flag(self.coordinator.args, "replicas"))
        self.assertGreaterEqual(replicas, 2 if "replicated" in self.overlay else 1)
        pods = sts["spec"]["replicas"]
        self.assertEqual(pods % replicas, 0,
                         f"{pods} stage pods do not hold {replicas} replicas of each stage")
        anti = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        self.assertIn("requiredDuringSchedulingIgnoredDuringExecution", anti)

    def test_probes_run_the_cli_health_check_on_the_serving_ports(self):
        # Kubernetes' grpc probes cannot speak TLS: every probe execs the
        # image's CLI against the port the server listens on.
        dockerfile = read("deploy/Dockerfile")
        self.assertIn("COPY bin/ /usr/local/bin/", dockerfile)
        self.assertIn('"$bin/client/pipeserve"', read("tools/image.sh"))
        for w in self.workloads:
            kinds = [k for k, _ in w.probes()]
            self.assertIn("readinessProbe", kinds, w.name)
            self.assertIn("livenessProbe", kinds, w.name)
            port = int(flag(w.args, "port"))
            for kind, probe in w.probes():
                with self.subTest(workload=w.name, probe=kind):
                    self.assertEqual(set(probe) & {"exec", "grpc", "httpGet", "tcpSocket"},
                                     {"exec"})
                    cmd = probe["exec"]["command"]
                    self.assertEqual(cmd[:2], [CLI, "health"])
                    self.assertEqual(flag(cmd, "server"), f"localhost:{port}")
                    self.assertGreaterEqual(probe.get("timeoutSeconds", 1), 2,
                                            "a TLS health check needs more than 1 s")
        self.assertEqual(find(self.coord, "Service", "pipeserve")["spec"]["ports"][0]["targetPort"],
                         int(flag(self.coordinator.args, "port")))

    def test_probes_use_tls_with_mounted_files(self):
        for w in self.workloads:
            ca = w.resolve(flag(w.args, "cluster_ca"))
            for kind, probe in w.probes():
                with self.subTest(workload=w.name, probe=kind):
                    cmd = probe["exec"]["command"]
                    # The server's certificate chains to the cluster CA.
                    self.assertEqual(w.resolve(flag(cmd, "tls_ca")), ca)
                    if has_flag(w.args, "tls_cert"):
                        continue  # the coordinator: no client certificate needed
                    # Stage servers require a client certificate: the probe
                    # presents the pod's own.
                    self.assertEqual(w.resolve(flag(cmd, "tls_cert")),
                                     w.resolve(flag(w.args, "cluster_cert")))
                    self.assertEqual(w.resolve(flag(cmd, "tls_key")),
                                     w.resolve(flag(w.args, "cluster_key")))

    def test_nothing_serves_without_tls(self):
        required = {
            self.coordinator.name: ["tls_cert", "tls_key", "auth_tokens",
                                    "cluster_ca", "cluster_cert", "cluster_key"],
            self.stage.name: ["cluster_ca", "cluster_cert", "cluster_key"],
        }
        for w in self.workloads:
            with self.subTest(workload=w.name):
                self.assertEqual(flag(w.args, "host"), "0.0.0.0")
                for name in required[w.name]:
                    self.assertTrue(has_flag(w.args, name), f"{w.name}: no --{name}")
                commands = [w.args] + [p["exec"]["command"] for _, p in w.probes()
                                       if "exec" in p]
                for cmd in commands:
                    for a in cmd:
                        if "allow_insecure" in a:
                            self.assertIn(a, ("--allow_insecure=false", "--noallow_insecure"),
                                          f"{w.name} runs with {a}")
                for env in w.container.get("env", []):
                    self.assertNotIn("INSECURE", env["name"].upper())

    def test_every_file_flag_names_a_documented_key_of_a_mounted_secret(self):
        documented = documented_secrets()
        self.assertIn("pipeserve-tls", documented)
        self.assertIn("pipeserve-tokens", documented)
        for w in self.workloads:
            commands = [w.args] + [p["exec"]["command"] for _, p in w.probes() if "exec" in p]
            paths = [m.group(2) for cmd in commands for a in cmd
                     for m in [FILE_FLAGS.match(a)] if m]
            self.assertTrue(paths, w.name)
            for path in paths:
                with self.subTest(workload=w.name, path=path):
                    secret, key = w.resolve(path)
                    self.assertIn(secret, documented,
                                  f"{secret} is not made in deploy/README.md")
                    self.assertIn(key, documented[secret],
                                  f"deploy/README.md makes {secret} without key {key}")

    def test_every_mount_has_a_volume_and_every_secret_is_documented(self):
        documented = documented_secrets()
        for w in self.workloads:
            mounts = {m["name"] for m in w.container.get("volumeMounts", [])}
            for name in mounts:
                self.assertIn(name, w.volumes, f"{w.name}: mount {name} has no volume")
            for name, volume in w.volumes.items():
                files = secret_files(volume)
                if files is None:
                    continue
                with self.subTest(workload=w.name, volume=name):
                    self.assertIn(name, mounts, "Secret volume never mounted")
                    for secret, key in files.values():
                        self.assertIn(key, documented.get(secret, ()), f"{secret}/{key}")
                    mode = volume.get("secret", {}).get("defaultMode", 0o644)
                    self.assertEqual(mode & 0o007, 0, f"{name}: world-readable key files")
        # The stage pods get no coordinator key, the coordinator no stage key.
        stage_keys = {k for _, k in secret_files(self.stage.volumes["tls"]).values()}
        coord_keys = {k for _, k in secret_files(self.coordinator.volumes["tls"]).values()}
        self.assertNotIn("coordinator.key", stage_keys)
        self.assertNotIn("stage.key", coord_keys)
        for w in self.workloads:
            for volume in w.volumes.values():
                for secret, key in (secret_files(volume) or {}).values():
                    self.assertNotEqual(key, "ca.key", "the CA key stays off the cluster")

    def test_pods_run_as_the_image_user_who_can_read_the_secrets(self):
        dockerfile = read("deploy/Dockerfile")
        uid = int(re.search(r"useradd .*--uid (\d+)", dockerfile).group(1))
        gid = int(re.search(r"groupadd .*--gid (\d+)", dockerfile).group(1))
        self.assertIn(f"USER {uid}", dockerfile)
        for w in self.workloads:
            with self.subTest(workload=w.name):
                ctx = w.pod["securityContext"]
                self.assertTrue(ctx["runAsNonRoot"])
                self.assertEqual((ctx["runAsUser"], ctx["runAsGroup"], ctx["fsGroup"]),
                                 (uid, gid, gid))
                self.assertFalse(w.container["securityContext"]["allowPrivilegeEscalation"])
                for name, volume in w.volumes.items():
                    if "secret" in volume:
                        # Secret files belong to root and the fsGroup.
                        self.assertTrue(volume["secret"].get("defaultMode", 0o644) & 0o040,
                                        f"{name}: the group cannot read the files")

    def test_stage_servers_admit_only_pipeserve_pods(self):
        policy = find(self.stages, "NetworkPolicy")
        labels = self.stage.doc["spec"]["template"]["metadata"]["labels"]
        selector = policy["spec"]["podSelector"]["matchLabels"]
        self.assertTrue(selector.items() <= labels.items())
        grpc = int(flag(self.stage.args, "port"))
        (rule,) = [r for r in policy["spec"]["ingress"]
                   if grpc in [p["port"] for p in r["ports"]]]
        self.assertEqual([p["port"] for p in rule["ports"]], [grpc])
        # Any other rule opens only the metrics port.
        metrics = int(flag(self.stage.args, "metrics_port"))
        for other in policy["spec"]["ingress"]:
            if other is not rule:
                self.assertEqual([p["port"] for p in other["ports"]], [metrics])
        coord_labels = self.coordinator.doc["spec"]["template"]["metadata"]["labels"]
        for peer in rule["from"]:
            self.assertEqual(set(peer), {"podSelector"}, "only pods of this namespace")
            allowed = peer["podSelector"]["matchLabels"].items()
            self.assertTrue(allowed <= coord_labels.items() and allowed <= labels.items(),
                            "the coordinator and the stages must both be admitted")

    def test_prometheus_scrapes_the_metrics_port(self):
        tmpl = self.coordinator.doc["spec"]["template"]
        port = flag(self.coordinator.args, "metrics_port")
        self.assertEqual(tmpl["metadata"]["annotations"]["prometheus.io/port"], port)
        ports = {p["name"]: p["targetPort"] for p in find(self.coord, "Service", "pipeserve")["spec"]["ports"]}
        self.assertEqual(ports["metrics"], int(port))

    def test_prometheus_scrapes_every_stage_server(self):
        tmpl = self.stage.doc["spec"]["template"]
        port = flag(self.stage.args, "metrics_port")
        self.assertIsNotNone(port, "stage servers export metrics")
        notes = tmpl["metadata"]["annotations"]
        self.assertEqual(notes["prometheus.io/scrape"], "true")
        self.assertEqual(notes["prometheus.io/port"], port)
        ports = {p["name"]: p["containerPort"] for p in self.stage.container["ports"]}
        self.assertEqual(ports["metrics"], int(port))

    def test_model_repository_is_on_the_persistent_volume(self):
        w = self.coordinator
        (mount,) = [m for m in w.container["volumeMounts"]
                    if m["mountPath"] == flag(w.args, "repository")]
        claim = w.volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        find(self.coord, "PersistentVolumeClaim", claim)
        self.assertFalse(mount.get("readOnly", False))

    def test_entrypoint_knows_every_role_the_manifests_use(self):
        roles = re.search(r"^\s*([a-z_|]+)\) exec", read("deploy/entrypoint.sh"),
                          re.M).group(1).split("|")
        for w in self.workloads:
            self.assertIn(w.args[0], roles)


def node_modules():
    """Where tools/bootstrap.sh put kubernetes-models."""
    lock = os.path.join(ROOT, "tests/k8s_schema/package-lock.json")
    with open(lock, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    base = os.environ.get("PIPESERVE_NODE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "pipeserve-node")
    return os.path.join(base, digest)


def binary_flags(path, *args):
    """The --flags a binary of this build declares, from its help text."""
    out = subprocess.run([os.path.join(ROOT, path), *args], capture_output=True, text=True,
                         timeout=60)
    return set(re.findall(r"--([a-z_]+)", out.stdout + out.stderr))


@unittest.skipUnless(os.environ.get("TEST_SRCDIR"), "needs the binaries: run it with bazel test")
class IdentityTest(unittest.TestCase):
    """Stage servers admit control calls from the coordinator's certificate
    name only: the names the manifests pass are the ones
    tools/make_dev_certs.sh gives (make_dev_certs_test checks those)."""

    def test_stage_servers_know_the_certificate_names(self):
        args = Workload(find(render("gpu"), "StatefulSet")).args
        self.assertEqual(flag(args, "coordinator_identity"), "pipeserve coordinator")
        self.assertEqual(flag(args, "stage_identity"), "pipeserve stage")
        self.assertIn('-subj "/O=pipeserve development/CN=pipeserve $role"',
                      read("tools/make_dev_certs.sh"))


class FlagsTest(unittest.TestCase):
    """Every flag the manifests pass is one the binaries know: a renamed
    flag fails here, not at a pod's start."""

    def test_manifest_flags_exist_in_the_binaries(self):
        binaries = {
            "coordinator": binary_flags("server/coordinator/coordinator", "--helpfull"),
            "stage_server": binary_flags("server/stage/stage_server", "--helpfull"),
        }
        health = binary_flags("client/pipeserve", "health", "--help")
        for overlay in OVERLAYS:
            docs = render(overlay)
            for doc in docs:
                if doc["kind"] not in ("Deployment", "StatefulSet"):
                    continue
                w = Workload(doc, docs)
                role, args = w.args[0], w.args[1:]
                for a in args:
                    name = a[2:].split("=", 1)[0]
                    with self.subTest(workload=w.name, flag=name):
                        self.assertIn(name, binaries[role])
                for kind, probe in w.probes():
                    for a in probe["exec"]["command"][2:]:
                        name = a[2:].split("=", 1)[0]
                        with self.subTest(workload=w.name, probe=kind, flag=name):
                            self.assertIn(name, health)


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

    def test_pods_get_longer_to_stop_than_the_servers_grace_period(self):
        # SIGTERM → the server's --shutdown_grace_s → exit 0; the kubelet's
        # SIGKILL must never come first (preStop time counts against it).
        for path in OVERLAYS:
            for doc in render(path):
                if doc["kind"] not in ("Deployment", "StatefulSet"):
                    continue
                pod = doc["spec"]["template"]["spec"]
                for c in pod["containers"]:
                    grace = [int(a.split("=", 1)[1]) for a in c["args"]
                             if a.startswith("--shutdown_grace_s=")]
                    self.assertEqual(len(grace), 1, f"{path} {c['name']}")
                    pre = c.get("lifecycle", {}).get("preStop", {})
                    sleep = pre.get("exec", {}).get("command", [None, "0"])
                    pre_s = int(sleep[1]) if sleep[0] == "sleep" else 0
                    self.assertGreaterEqual(
                        pod.get("terminationGracePeriodSeconds", 30),
                        grace[0] + pre_s + 5, f"{path} {c['name']}")

    def test_a_disruption_budget_takes_one_stage_server_at_a_time(self):
        docs = render("gpu-replicated")
        pdb = find(docs, "PodDisruptionBudget")
        sts = find(docs, "StatefulSet", "stage")
        self.assertEqual(pdb["spec"]["maxUnavailable"], 1)
        self.assertEqual(pdb["spec"]["selector"]["matchLabels"],
                         sts["spec"]["selector"]["matchLabels"])

    def test_manifests_match_the_kubernetes_schemas(self):
        named = []
        for overlay in OVERLAYS:
            for i, doc in enumerate(render(overlay)):
                named.append((f"overlays/{overlay} #{i} {doc.get('kind')} "
                              f"{doc.get('metadata', {}).get('name')}", doc))
        self.assertEqual(len(named), 8 * len(OVERLAYS))
        rc, problems = self.validate(named)
        self.assertEqual(problems, [])
        self.assertEqual(rc, 0)

    def test_the_schema_check_catches_mistakes(self):
        # So a broken validator cannot pass the manifests silently.
        doc = find(render("gpu"), "Deployment")
        misspelt = json.loads(json.dumps(doc))
        c = misspelt["spec"]["template"]["spec"]["containers"][0]
        c["readinesProbe"] = c.pop("readinessProbe")
        c["volumeMounts"][1]["readonly"] = c["volumeMounts"][1].pop("readOnly")
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


for _overlay in OVERLAYS:
    _name = "DeployTest_" + _overlay.replace("-", "_")
    globals()[_name] = type(_name, (OverlayChecks, unittest.TestCase), {"overlay": _overlay})


if __name__ == "__main__":
    unittest.main()
