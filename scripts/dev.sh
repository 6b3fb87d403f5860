#!/usr/bin/env bash
# Set up (or reuse) the project's virtualenv, build the extension, and run a job.
#
#   bash scripts/dev.sh latency [args]  # speedup vs theoretical FLOPs on the embedded defaults
#   bash scripts/dev.sh test [args]     # the test suite
#   bash scripts/dev.sh setup           # only the set-up
#
# Works from a fresh clone on a fresh machine: it creates .venv/ in the checkout, installs
# the pinned requirements, installs the Fashion-MNIST Debian package when apt is usable,
# and builds dynexec._C in place. DYNEXEC_VENV overrides the virtualenv location.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${DYNEXEC_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}

log() { printf '[dev.sh] %s\n' "$*" >&2; }

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  local stamp="$VENV/.dynexec-requirements"
  if ! cmp -s requirements.txt "$stamp" 2>/dev/null; then
    log "installing pinned requirements"
    python -m pip install --quiet -r requirements.txt
    cp requirements.txt "$stamp"
  fi
  if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo -n"
    if command -v apt-get >/dev/null 2>&1; then
      log "installing the Debian package dataset-fashion-mnist (real test images)"
      { $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
        || log "WARNING: could not install dataset-fashion-mnist; tools fall back to random inputs"
    fi
  fi
  log "building dynexec (native extension dynexec._C)"
  local build_log="$VENV/.dynexec-build.log"
  # DYNEXEC_ONEDNN=1: the pinned oneDNN wheels are installed, so the build must use them.
  if ! DYNEXEC_ONEDNN=1 python -m pip install --no-build-isolation --no-deps -e . >"$build_log" 2>&1; then
    cat "$build_log" >&2
    log "ERROR: building dynexec failed (log above)"
    exit 1
  fi
  # The package works without its extension (pure-PyTorch backend), but this project's
  # jobs must not silently measure or test without it.
  python - <<'PY'
import sys, warnings
warnings.simplefilter("ignore")
from dynexec.runtime.ops import backend_status
ok, why = backend_status("cpu")["native"]
print("[dev.sh] native backend:", "available" if ok else "MISSING - " + why, file=sys.stderr)
from dynexec.runtime.program import onednn_direct_available
onednn = ok and onednn_direct_available()
print("[dev.sh] oneDNN convolutions:", "available" if onednn else "MISSING", file=sys.stderr)
sys.exit(0 if onednn else 1)
PY
}

job=${1:-test}
shift || true
case "$job" in
  setup) setup ;;
  test) setup; exec python -m pytest -q -p no:cacheprovider "$@" tests ;;
  latency) setup; exec python benchmarks/latency.py --device cpu "$@" ;;
  *) echo "usage: bash scripts/dev.sh {test|latency|setup} [args]" >&2; exit 2 ;;
esac
