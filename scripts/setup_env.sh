#!/usr/bin/env bash
# Install what the recipe needs, once: Debian packages for the demo corpus and a
# project virtualenv in .venv with pinned Python packages. Safe to rerun: a stamp
# file records the hash of the requirement files, so a second run does nothing.
#
# Usage: scripts/setup_env.sh [--test]   (--test also installs pytest and hypothesis)
#
# Environment:
#   PYTHON            interpreter for the virtualenv (default: python3, 3.10 or newer)
#   TORCH_INDEX_URL   extra pip index for torch, e.g. a CPU-only wheel index on a
#                     machine without a GPU whose default index serves a CUDA build
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
with_test=false
[ "${1:-}" = "--test" ] && with_test=true

log() { echo "$(date '+%Y-%m-%d %H:%M:%S') [setup_env] $*" >&2; }

# 1. Debian packages: espeak-ng and sox synthesize the demo corpus, fortunes-zh
#    carries its Chinese text.
declare -A debian_package_of=([espeak-ng]=espeak-ng [sox]=sox)
missing=()
for cmd in "${!debian_package_of[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${debian_package_of[$cmd]}")
done
[ -e /usr/share/games/fortunes/chinese ] || missing+=(fortunes-zh)
# The test suite checks our error counts against NIST sclite (Debian package sctk).
if $with_test && ! command -v sclite >/dev/null 2>&1 && [ ! -x /usr/lib/sctk/bin/sclite ]; then
  missing+=(sctk)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    log "missing system packages: ${missing[*]}"
    log "install them as root, e.g.: sudo apt-get install ${missing[*]}"
    exit 1
  fi
fi

# 2. The virtualenv. The stamp covers every file that decides what is installed.
stamp_input=("$root/requirements.txt" "$root/pyproject.toml")
$with_test && stamp_input+=("$root/requirements-test.txt")
want=$(cat "${stamp_input[@]}" | sha256sum | cut -c1-16)
stamp="$venv/.installed-$want"
if [ -e "$stamp" ]; then
  exit 0
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  log "$python is older than Python 3.10; set PYTHON to a newer interpreter"
  exit 1
fi
[ -x "$venv/bin/python" ] || { log "creating $venv"; "$python" -m venv "$venv"; }
pip=("$venv/bin/python" -m pip install -q)

# torch first and alone: a plain 'torch' requirement pulled in by another package
# would download a multi-GB CUDA build. torchaudio is deliberately not installed.
torch_args=(torch==2.13.0)
[ -n "${TORCH_INDEX_URL:-}" ] && torch_args+=(--extra-index-url "$TORCH_INDEX_URL")
log "installing torch 2.13.0"
"${pip[@]}" "${torch_args[@]}"

log "installing pinned requirements and the sparlora package"
"${pip[@]}" -r "$root/requirements.txt" -e "$root"
if $with_test; then
  "${pip[@]}" -r "$root/requirements-test.txt"
fi

rm -f "$venv"/.installed-*
touch "$stamp"
log "environment ready in $venv"
