#!/usr/bin/env bash
# Installs the Debian packages kvtk needs, idempotently: nothing is fetched when all are present.
# Usage: scripts/setup.sh    (as root, or with sudo available)
set -euo pipefail
packages=(build-essential cmake ninja-build pkg-config git
  libhdf5-dev hdf5-tools libcli11-dev libzstd-dev zstd
  libgtest-dev libgmock-dev libbenchmark-dev libomp-dev
  python3 python3-h5py python3-numpy man-db clang-format
  clang libclang-rt-dev bsdutils parallel)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
# Test-side Python references (PyPI): gguf's reference (de)quantizers and GGUF writer.
if ! python3 -c "import gguf, numpy" 2>/dev/null; then
  echo "setup: installing gguf, numpy for $(command -v python3)" >&2
  python3 -m pip install -q "gguf==0.19.0" numpy >&2
fi
