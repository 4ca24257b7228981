#!/usr/bin/env bash
# Makes a development certificate authority, the coordinator's and the stage
# servers' certificates, and API tokens for a TLS + token deployment
# (deploy/README.md), with openssl only.
#
# Usage: tools/make_dev_certs.sh OUT_DIR [--dns NAME]... [--ip ADDR]...
#            [--namespace NS] [--stages N] [--days N] [--force]
#
# Writes into OUT_DIR (made if missing):
#   ca.crt ca.key               the CA (keep ca.key off the cluster)
#   coordinator.crt .key        client-facing port and client cert towards stages
#   stage.crt stage.key         stage servers (server and client certificate)
#   tokens                      --auth_tokens file: "admin <hex>" and "infer <hex>"
#   admin.token infer.token     the bare tokens, for `pipeserve --token_file`
# Keys and token files are mode 0600, EC P-256 keys in PKCS#8 PEM, SHA-256
# signatures. Both leaf certificates carry serverAuth and clientAuth.
#
# SANs: both certificates name localhost, 127.0.0.1 and ::1 (the exec probes
# dial localhost). The coordinator adds pipeserve, pipeserve.NS.svc and
# pipeserve.NS.svc.cluster.local; the stage certificate adds
# *.pipeserve-stages, *.pipeserve-stages.NS.svc and
# *.pipeserve-stages.NS.svc.cluster.local, plus stage-0.pipeserve-stages ...
# stage-(N-1).pipeserve-stages by name (N = --stages, default 16): gRPC
# matches a wildcard only when two labels follow it, so `*.pipeserve-stages`
# alone does not cover the short names coordinator.yaml's --stage_servers
# uses. --dns and --ip add names to both certificates.
#
# Refuses to replace existing outputs unless --force; everything is made in
# a scratch folder first and moved into place at the end.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}
die() { echo "make_dev_certs: $*" >&2; exit 1; }

out=""
namespace=default
stages=16
days=365
force=0
dns=()
ips=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dns) [ $# -ge 2 ] || usage; dns+=("$2"); shift 2 ;;
    --dns=*) dns+=("${1#*=}"); shift ;;
    --ip) [ $# -ge 2 ] || usage; ips+=("$2"); shift 2 ;;
    --ip=*) ips+=("${1#*=}"); shift ;;
    --namespace) [ $# -ge 2 ] || usage; namespace=$2; shift 2 ;;
    --namespace=*) namespace=${1#*=}; shift ;;
    --stages) [ $# -ge 2 ] || usage; stages=$2; shift 2 ;;
    --stages=*) stages=${1#*=}; shift ;;
    --days) [ $# -ge 2 ] || usage; days=$2; shift 2 ;;
    --days=*) days=${1#*=}; shift ;;
    --force) force=1; shift ;;
    -h|--help) usage ;;
    -*) echo "make_dev_certs: unknown option $1" >&2; usage ;;
    *) [ -z "$out" ] || usage; out=$1; shift ;;
  esac
done
[ -n "$out" ] || usage

command -v openssl >/dev/null || die "openssl not found (apt-get install openssl, or run tools/bootstrap.sh)"
[[ "$namespace" =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || die "--namespace '$namespace' is not a Kubernetes namespace name"
[[ "$stages" =~ ^[0-9]+$ ]] || die "--stages wants a number, not '$stages'"
[[ "$days" =~ ^[1-9][0-9]*$ ]] || die "--days wants a positive number, not '$days'"
for n in "${dns[@]+"${dns[@]}"}"; do
  [[ "$n" =~ ^(\*\.)?[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?$ ]] || die "--dns '$n' is not a DNS name"
done
for a in "${ips[@]+"${ips[@]}"}"; do
  [[ "$a" =~ ^[0-9A-Fa-f:.]+$ ]] || die "--ip '$a' is not an IP address"
done

outputs=(ca.crt ca.key coordinator.crt coordinator.key stage.crt stage.key
         tokens admin.token infer.token)
if [ ! -d "$out" ]; then
  mkdir -p "$out"
  chmod 0700 "$out"  # a new folder for keys: owner only
fi
if [ "$force" = 0 ]; then
  existing=()
  for f in "${outputs[@]}"; do
    if [ -e "$out/$f" ]; then existing+=("$f"); fi
  done
  if [ ${#existing[@]} -gt 0 ]; then
    die "$out already holds ${existing[*]}; not replacing them (pass --force to make a new CA, certificates and tokens)"
  fi
fi

umask 077
work=$(mktemp -d "$out/.make_dev_certs.XXXXXX")
trap 'rm -rf "$work"' EXIT

# SANs as openssl writes them: DNS:name or IP:address.
coordinator_sans=(DNS:localhost IP:127.0.0.1 IP:::1 DNS:pipeserve
                  "DNS:pipeserve.$namespace.svc" "DNS:pipeserve.$namespace.svc.cluster.local")
# The per-pod names come before the wildcards: gRPC stops at the first SAN
# that matches, and logs an error for each `*.pipeserve-stages`-style
# wildcard it tries against a two-label name.
stage_sans=(DNS:localhost IP:127.0.0.1 IP:::1)
for ((i = 0; i < stages; i++)); do stage_sans+=("DNS:stage-$i.pipeserve-stages"); done
stage_sans+=("DNS:*.pipeserve-stages" "DNS:*.pipeserve-stages.$namespace.svc"
             "DNS:*.pipeserve-stages.$namespace.svc.cluster.local")
for n in "${dns[@]+"${dns[@]}"}"; do coordinator_sans+=("DNS:$n"); stage_sans+=("DNS:$n"); done
for a in "${ips[@]+"${ips[@]}"}"; do coordinator_sans+=("IP:$a"); stage_sans+=("IP:$a"); done

# One config for every step, so the host's openssl.cnf adds nothing.
leaf_section() {  # name, then its SANs
  local name=$1 sans
  shift
  sans=$(IFS=,; echo "$*")
  cat <<EOF
[$name]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = $sans
EOF
}
{
  cat <<EOF
[req]
distinguished_name = dn
prompt = no
[dn]
O = pipeserve development
[ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
  leaf_section coordinator "${coordinator_sans[@]}"
  leaf_section stage "${stage_sans[@]}"
} > "$work/openssl.cnf"
export OPENSSL_CONF="$work/openssl.cnf"

newkey() {
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
    -pkeyopt ec_param_enc:named_curve -out "$work/$1.key" 2>/dev/null
}
serial() { echo "0x$(openssl rand -hex 16)"; }

newkey ca
openssl req -new -x509 -config "$work/openssl.cnf" -key "$work/ca.key" -sha256 \
  -days "$days" -set_serial "$(serial)" -extensions ca \
  -subj "/O=pipeserve development/CN=pipeserve development CA" -out "$work/ca.crt"

for role in coordinator stage; do
  newkey "$role"
  openssl req -new -config "$work/openssl.cnf" -key "$work/$role.key" \
    -subj "/O=pipeserve development/CN=pipeserve $role" -out "$work/$role.csr"
  openssl x509 -req -in "$work/$role.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
    -set_serial "$(serial)" -days "$days" -sha256 \
    -extfile "$work/openssl.cnf" -extensions "$role" -out "$work/$role.crt" 2>/dev/null
  openssl verify -CAfile "$work/ca.crt" -purpose sslserver "$work/$role.crt" >/dev/null
  openssl verify -CAfile "$work/ca.crt" -purpose sslclient "$work/$role.crt" >/dev/null
done

admin=$(openssl rand -hex 32)
infer=$(openssl rand -hex 32)
cat > "$work/tokens" <<EOF
# pipeserve API tokens (coordinator --auth_tokens): "<scopes> <token>" per
# line, scopes a comma-separated subset of infer,admin (admin implies infer).
admin $admin
infer $infer
EOF
echo "$admin" > "$work/admin.token"
echo "$infer" > "$work/infer.token"

chmod 0600 "$work"/*.key "$work/tokens" "$work/admin.token" "$work/infer.token"
chmod 0644 "$work"/*.crt
for f in "${outputs[@]}"; do mv -f "$work/$f" "$out/$f"; done

echo "make_dev_certs: wrote ${outputs[*]} to $out" >&2
echo "make_dev_certs: stage certificate names stage-0..stage-$((stages - 1)).pipeserve-stages (namespace $namespace)" >&2
