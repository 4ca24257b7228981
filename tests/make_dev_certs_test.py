"""Checks tools/make_dev_certs.sh: its certificates chain to its CA, carry
the SANs, key usages, curve and digest deploy/README.md promises, its keys
and tokens are private, its tokens file parses in the coordinator's
--auth_tokens format, it refuses to replace earlier outputs without
--force, and the certificates pass a mutual-TLS handshake (and a stranger's
certificate is refused) both in openssl and in gRPC 1.51 (Debian's grpcio,
the same gRPC core as the servers), under the names coordinator.yaml
dials."""
import ipaddress
import glob
import os
import re
import stat
import subprocess
import tempfile
import unittest

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # expected handshake failures log errors

import grpc  # noqa: E402
import yaml  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPT = os.path.join(ROOT, "tools/make_dev_certs.sh")
OUTPUTS = ["ca.crt", "ca.key", "coordinator.crt", "coordinator.key", "stage.crt",
           "stage.key", "tokens", "admin.token", "infer.token"]
PRIVATE = ["ca.key", "coordinator.key", "stage.key", "tokens", "admin.token", "infer.token"]


def make(out, *args, check=True):
    run = subprocess.run(["bash", SCRIPT, out, *args], capture_output=True, text=True,
                         timeout=120)
    if check and run.returncode != 0:
        raise AssertionError(f"make_dev_certs.sh failed:\n{run.stderr}")
    return run


def slurp(path):
    with open(path) as f:
        return f.read()


def openssl(*args, input=None):
    run = subprocess.run(["openssl", *args], capture_output=True, text=True, input=input,
                         timeout=60)
    return run.returncode, run.stdout + run.stderr


def sans(cert):
    rc, out = openssl("x509", "-in", cert, "-noout", "-ext", "subjectAltName")
    assert rc == 0, out
    names = set()
    for entry in out.split("\n", 1)[1].strip().split(", "):
        kind, value = entry.split(":", 1)
        if kind == "IP Address":
            names.add("IP:" + str(ipaddress.ip_address(value)))
        else:
            names.add(f"{kind}:{value}")
    return names


def parse_tokens(text):
    """{token: set of scopes} from an --auth_tokens file; raises on bad lines."""
    tokens = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        scopes, token = line.split()
        scopes = set(scopes.split(","))
        if not scopes <= {"infer", "admin"}:
            raise ValueError(f"bad scopes in {line!r}")
        if token in tokens:
            raise ValueError("duplicate token")
        tokens[token] = scopes
    return tokens


def stage_server_hosts(namespace="ml"):
    """The names the coordinator's dns launcher dials: every stage pod of
    the largest StatefulSet any kustomization makes, as the headless
    Service's SRV records name them."""
    pods = 0
    for path in glob.glob(os.path.join(ROOT, "deploy/k8s/**/*.yaml"), recursive=True):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc:
                    continue
                if doc.get("kind") == "StatefulSet":  # the base's, or an overlay's patch
                    pods = max(pods, doc["spec"].get("replicas", 0))
                if path.endswith("kustomization.yaml"):
                    pods = max([pods] + [r["count"] for r in doc.get("replicas", [])])
    if not pods:
        raise AssertionError("no stage StatefulSet in deploy/k8s")
    return [f"stage-{i}.pipeserve-stages.{namespace}.svc.cluster.local" for i in range(pods)]


class MakeDevCertsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dir = os.path.join(cls.tmp.name, "certs")
        cls.first = make(cls.dir, "--namespace", "ml", "--dns", "pipeserve.example.com",
                       "--ip", "10.1.2.3", "--ip=fd00::7")
        # A second CA, for the certificates that must be refused.
        cls.other = os.path.join(cls.tmp.name, "other")
        make(cls.other)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def path(self, name, d=None):
        return os.path.join(d or self.dir, name)

    def read(self, name, d=None):
        return slurp(self.path(name, d))

    def test_writes_every_output(self):
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(OUTPUTS))

    def test_certificates_chain_to_the_ca_for_server_and_client_use(self):
        for leaf in ("coordinator.crt", "stage.crt"):
            for purpose in ("sslserver", "sslclient"):
                rc, out = openssl("verify", "-CAfile", self.path("ca.crt"), "-purpose", purpose,
                                  self.path(leaf))
                self.assertEqual(rc, 0, out)
            rc, out = openssl("verify", "-CAfile", self.path("ca.crt", self.other),
                              self.path(leaf))
            self.assertNotEqual(rc, 0, "verified against a different CA")

    def test_extensions_curve_and_digest(self):
        rc, ca = openssl("x509", "-in", self.path("ca.crt"), "-noout", "-text")
        self.assertRegex(ca, r"Basic Constraints: critical\s+CA:TRUE")
        self.assertRegex(ca, r"Key Usage: critical\s+Certificate Sign, CRL Sign")
        for leaf in ("coordinator", "stage"):
            rc, text = openssl("x509", "-in", self.path(leaf + ".crt"), "-noout", "-text")
            self.assertRegex(text, r"Basic Constraints: critical\s+CA:FALSE")
            self.assertRegex(text, r"Extended Key Usage: \s*TLS Web Server Authentication, "
                                   r"TLS Web Client Authentication")
            self.assertIn("Signature Algorithm: ecdsa-with-SHA256", text)
            self.assertIn("NIST CURVE: P-256", text)
            self.assertRegex(text, r"Not After : ")
            rc, _ = openssl("x509", "-in", self.path(leaf + ".crt"), "-noout",
                            "-checkend", str(364 * 86400))
            self.assertEqual(rc, 0, "valid for less than 364 days")
        for key in ("ca.key", "coordinator.key", "stage.key"):
            # PKCS#8 PEM: what gRPC's OpenSSL and BoringSSL builds both load.
            self.assertTrue(self.read(key).startswith("-----BEGIN PRIVATE KEY-----\n"), key)
            rc, text = openssl("pkey", "-in", self.path(key), "-noout", "-text")
            self.assertEqual(rc, 0, text)
            self.assertIn("NIST CURVE: P-256", text)
        for role in ("ca", "coordinator", "stage"):
            _, from_key = openssl("pkey", "-in", self.path(role + ".key"), "-pubout")
            _, from_cert = openssl("x509", "-in", self.path(role + ".crt"), "-noout", "-pubkey")
            self.assertEqual(from_key, from_cert, f"{role}.key does not match {role}.crt")

    def test_leaf_certificates_are_named_by_role(self):
        # Stage servers tell the coordinator from a stage server by these
        # common names (--coordinator_identity, --stage_identity; the
        # manifests pass them, deploy_test checks that).
        for role in ("coordinator", "stage"):
            rc, out = openssl("x509", "-in", self.path(role + ".crt"), "-noout", "-subject",
                              "-nameopt", "multiline")
            self.assertEqual(rc, 0, out)
            self.assertIn(f"commonName                = pipeserve {role}", out)

    def test_subject_alternative_names(self):
        common = {"DNS:localhost", "IP:127.0.0.1", "IP:::1",
                  "DNS:pipeserve.example.com", "IP:10.1.2.3", "IP:fd00::7"}
        self.assertEqual(sans(self.path("coordinator.crt")), common | {
            "DNS:pipeserve", "DNS:pipeserve.ml.svc", "DNS:pipeserve.ml.svc.cluster.local"})
        self.assertEqual(sans(self.path("stage.crt")), common | {
            "DNS:*.pipeserve-stages", "DNS:*.pipeserve-stages.ml.svc",
            "DNS:*.pipeserve-stages.ml.svc.cluster.local"} | {
            f"DNS:stage-{i}.pipeserve-stages" for i in range(16)})
        # The names the manifests dial, as openssl matches them.
        for host in stage_server_hosts() + ["stage-0.pipeserve-stages.ml.svc", "localhost"]:
            rc, out = openssl("x509", "-in", self.path("stage.crt"), "-noout", "-checkhost", host)
            self.assertIn("does match", out, host)
        for host in ("pipeserve", "pipeserve.ml.svc.cluster.local", "localhost"):
            rc, out = openssl("x509", "-in", self.path("coordinator.crt"), "-noout",
                              "-checkhost", host)
            self.assertIn("does match", out, host)

    def test_stages_option_sets_the_per_pod_names(self):
        with tempfile.TemporaryDirectory() as d:
            make(d, "--stages", "2")
            names = sans(os.path.join(d, "stage.crt"))
        self.assertIn("DNS:stage-1.pipeserve-stages", names)
        self.assertNotIn("DNS:stage-2.pipeserve-stages", names)
        self.assertIn("DNS:*.pipeserve-stages.default.svc", names)

    def test_keys_and_tokens_are_private(self):
        for name in PRIVATE:
            mode = stat.S_IMODE(os.stat(self.path(name)).st_mode)
            self.assertEqual(mode, 0o600, f"{name} is {oct(mode)}")

    def test_tokens_file_parses_and_matches_the_bare_tokens(self):
        tokens = parse_tokens(self.read("tokens"))
        self.assertEqual(sorted(map(sorted, tokens.values())), [["admin"], ["infer"]])
        admin = self.read("admin.token").strip()
        infer = self.read("infer.token").strip()
        self.assertEqual(tokens[admin], {"admin"})
        self.assertEqual(tokens[infer], {"infer"})
        for t in (admin, infer):
            self.assertRegex(t, r"^[0-9a-f]{64}$")  # 32 random bytes
        self.assertEqual(self.read("admin.token"), admin + "\n")
        # Fresh per run.
        other = parse_tokens(self.read("tokens", self.other))
        self.assertFalse(set(other) & set(tokens))

    def test_token_parser_rejects_bad_lines(self):
        self.assertEqual(parse_tokens("# c\n\n infer,admin  abc \n"), {"abc": {"infer", "admin"}})
        for bad in ("root abc\n", "admin\n", "admin a b\n"):
            with self.assertRaises(ValueError):
                parse_tokens(bad)

    def test_refuses_to_overwrite_without_force(self):
        with tempfile.TemporaryDirectory() as d:
            os.chmod(d, 0o700)
            make(d)  # an existing, empty OUT_DIR is fine
            before = {n: slurp(os.path.join(d, n)) for n in OUTPUTS}
            again = make(d, check=False)
            self.assertNotEqual(again.returncode, 0)
            self.assertIn("--force", again.stderr)
            self.assertEqual({n: slurp(os.path.join(d, n)) for n in OUTPUTS}, before)
            # Only the CA left: still refused.
            for n in OUTPUTS:
                if n not in ("ca.crt", "ca.key"):
                    os.remove(os.path.join(d, n))
            self.assertNotEqual(make(d, check=False).returncode, 0)
            self.assertEqual(sorted(os.listdir(d)), ["ca.crt", "ca.key"])
            forced = make(d, "--force")
            self.assertEqual(forced.returncode, 0)
            self.assertEqual(sorted(os.listdir(d)), sorted(OUTPUTS))
            self.assertNotEqual(slurp(os.path.join(d, "ca.crt")), before["ca.crt"])

    def test_rejects_bad_arguments(self):
        with tempfile.TemporaryDirectory() as d:
            for args in (["--bogus"], ["--namespace", "Not_A_Namespace"], ["--dns", "a b"],
                         ["--days", "0"]):
                run = make(os.path.join(d, "x"), *args, check=False)
                self.assertNotEqual(run.returncode, 0, args)
                self.assertFalse(os.path.exists(os.path.join(d, "x", "ca.key")), args)

    def test_readme_secrets_take_files_the_script_writes(self):
        with open(os.path.join(ROOT, "deploy/README.md")) as f:
            text = f.read().replace("\\\n", " ")
        files = re.findall(r"--from-file=[^=\s]+=certs/(\S+)", text)
        self.assertTrue(files)
        for name in files:
            self.assertIn(name, OUTPUTS)
        self.assertNotIn("ca.key", files)
        self.assertIn("tools/make_dev_certs.sh certs/", text)

    # -- handshakes --------------------------------------------------------

    def s_server(self, cert, key, ca):
        """openssl s_server requiring a client certificate; returns (proc, port)."""
        proc = subprocess.Popen(
            ["openssl", "s_server", "-accept", "127.0.0.1:0", "-cert", cert, "-key", key,
             "-CAfile", ca, "-Verify", "1", "-verify_return_error", "-www"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.wait, 10)
        self.addCleanup(proc.kill)
        for line in proc.stdout:
            m = re.match(r"ACCEPT 127\.0\.0\.1:(\d+)", line)
            if m:
                return proc, int(m.group(1))
        raise AssertionError("s_server did not start")

    def s_client(self, port, ca, name, cert=None, key=None):
        args = ["s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", ca,
                "-verify_return_error", "-verify_hostname", name, "-servername", name, "-quiet"]
        if cert:
            args += ["-cert", cert, "-key", key]
        return openssl(*args, input="GET / HTTP/1.0\r\n\r\n")

    def test_openssl_mutual_tls_handshake(self):
        p = self.path
        _, port = self.s_server(p("stage.crt"), p("stage.key"), p("ca.crt"))
        for name in ("stage-0.pipeserve-stages", "localhost"):
            rc, out = self.s_client(port, p("ca.crt"), name, p("coordinator.crt"),
                                    p("coordinator.key"))
            self.assertEqual(rc, 0, out)
            self.assertIn("HTTP/1.0 200 ok", out)
        # A client certificate from another CA, or none, is refused.
        rc, out = self.s_client(port, p("ca.crt"), "localhost",
                                p("coordinator.crt", self.other), p("coordinator.key", self.other))
        self.assertNotEqual(rc, 0)
        self.assertIn("unknown ca", out)
        rc, out = self.s_client(port, p("ca.crt"), "localhost")
        self.assertNotEqual(rc, 0)
        self.assertIn("certificate required", out)
        # The client refuses a server from another CA, or under a name it lacks.
        rc, out = self.s_client(port, p("ca.crt", self.other), "localhost",
                                p("coordinator.crt"), p("coordinator.key"))
        self.assertNotEqual(rc, 0)
        rc, out = self.s_client(port, p("ca.crt"), "pipeserve.ml.svc",
                                p("coordinator.crt"), p("coordinator.key"))
        self.assertNotEqual(rc, 0)
        self.assertIn("hostname mismatch", out)

    def grpc_server(self, role, require_client_cert):
        from concurrent import futures
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "test.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)})])
        creds = grpc.ssl_server_credentials(
            [(self.read(role + ".key").encode(), self.read(role + ".crt").encode())],
            root_certificates=self.read("ca.crt").encode(),
            require_client_auth=require_client_cert)
        port = server.add_secure_port("127.0.0.1:0", creds)
        server.start()
        self.addCleanup(server.stop, None)
        return port

    def grpc_call(self, port, name, client=None, ca_dir=None):
        """Pings the server at 127.0.0.1:port as if dialing `name`, with the
        client certificate client + ".crt" (if any); the status code."""
        def read(path):
            with open(path, "rb") as f:
                return f.read()
        creds = grpc.ssl_channel_credentials(
            root_certificates=read(self.path("ca.crt", ca_dir)),
            private_key=read(client + ".key") if client else None,
            certificate_chain=read(client + ".crt") if client else None)
        with grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                 options=[("grpc.ssl_target_name_override", name)]) as ch:
            try:
                self.assertEqual(ch.unary_unary("/test.Echo/Ping")(b"hi", timeout=10), b"hi")
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return e.code()

    def test_grpc_mutual_tls_under_the_names_the_manifests_dial(self):
        coordinator, stage = self.path("coordinator"), self.path("stage")
        # A stage server: TLS with stage.crt, client certificates required.
        port = self.grpc_server("stage", require_client_cert=True)
        for host in stage_server_hosts() + ["stage-15.pipeserve-stages",
                                            "stage-2.pipeserve-stages.ml.svc", "localhost"]:
            # The coordinator, and the previous stage, dialing it.
            self.assertEqual(self.grpc_call(port, host, coordinator), grpc.StatusCode.OK, host)
            self.assertEqual(self.grpc_call(port, host, stage), grpc.StatusCode.OK, host)
        # gRPC matches no wildcard with a single label after it: pod 16 is
        # not named, and *.pipeserve-stages does not cover it.
        self.assertNotEqual(self.grpc_call(port, "stage-16.pipeserve-stages", coordinator),
                            grpc.StatusCode.OK)
        # A client certificate from another CA, or none, is refused.
        self.assertNotEqual(self.grpc_call(port, "localhost", self.path("coordinator", self.other)),
                            grpc.StatusCode.OK)
        self.assertNotEqual(self.grpc_call(port, "localhost"), grpc.StatusCode.OK)
        # The coordinator's client port: TLS, no client certificate.
        port = self.grpc_server("coordinator", require_client_cert=False)
        for host in ("localhost", "pipeserve", "pipeserve.ml.svc", "pipeserve.example.com"):
            self.assertEqual(self.grpc_call(port, host), grpc.StatusCode.OK, host)
        self.assertNotEqual(self.grpc_call(port, "localhost", ca_dir=self.other),
                            grpc.StatusCode.OK)


if __name__ == "__main__":
    unittest.main()
