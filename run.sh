#!/usr/bin/env bash
# The two quickstart commands. Each sets up what is missing (a virtual environment in
# .venv from the pinned requirements, reinstalled only when they change), then runs:
#   ./run.sh demo [args]   the demo on the synthetic world (python -m launch demo)
#   ./run.sh test [args]   the test suite (python -m pytest); also sets up img2dataset in
#                          .venv-img2dataset (a real img2dataset output is a test fixture);
#                          as root it first starts a 2-node Slurm on localhost
#                          (scripts/slurm_local.sh) for the slurm executor's tests, and a
#                          Docker engine with the project's images built from this checkout
#                          (scripts/docker_local.sh; cached: a fresh machine pays ~5 min once)
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
STAMP=$VENV/.requirements.sha256

find_python() {
  for py in ${PYTHON:-} python3.11 python3; do
    if command -v "$py" >/dev/null 2>&1 &&
       "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  echo "run.sh: error: Python 3.11 not found (set PYTHON=/path/to/python3.11)" >&2
  exit 2
}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "run.sh: creating $VENV" >&2
    "$(find_python)" -m venv "$VENV"
  fi
  local want
  want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
    echo "run.sh: installing requirements into $VENV (first time: a few minutes)" >&2
    "$VENV/bin/pip" install --disable-pip-version-check -q -r requirements-dev.txt
    echo "$want" > "$STAMP"
  fi
}

# The tests build a real img2dataset output (tests/test_img2dataset.py) with img2dataset in a
# venv of its own: its pins clash with the project's.
I2D_VENV=.venv-img2dataset
setup_img2dataset() {
  local want
  want=$(sha256sum requirements-img2dataset.txt | cut -d' ' -f1)
  if [ ! -x "$I2D_VENV/bin/img2dataset" ] || [ "$(cat "$I2D_VENV/.requirements.sha256" 2>/dev/null || true)" != "$want" ]; then
    echo "run.sh: installing img2dataset into $I2D_VENV (first time: about a minute)" >&2
    [ -x "$I2D_VENV/bin/python" ] || "$(find_python)" -m venv "$I2D_VENV"
    "$I2D_VENV/bin/pip" install --disable-pip-version-check -q -r requirements-img2dataset.txt
    echo "$want" > "$I2D_VENV/.requirements.sha256"
  fi
}

cmd=${1:-}
case "$cmd" in
  demo) shift; setup; exec "$VENV/bin/python" -m launch demo "$@" ;;
  test) shift; setup
        setup_img2dataset || echo "run.sh: img2dataset did not install; tests/test_img2dataset.py will fail" >&2
        if [ "$(id -u)" = 0 ]; then  # the slurm executor's tests need a Slurm: start one on localhost
          bash scripts/slurm_local.sh || echo "run.sh: Slurm did not start; its test will fail" >&2
          bash scripts/docker_local.sh all >/dev/null || echo "run.sh: the Docker images did not build; their tests will fail" >&2
        fi
        exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: ./run.sh demo [args] | ./run.sh test [pytest args]" >&2; exit 2 ;;
esac
