#!/usr/bin/env bash
# Idempotent set-up: Debian packages (when apt is usable), a virtualenv in .venv, and fastmem with
# its dev extras. Re-running is cheap: each step is skipped when its result is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FASTMEM_VENV:-.venv}
PYTHON=${PYTHON:-python3}

# Fashion-MNIST (the embedded default) from Debian, where we may use apt.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    echo "bootstrap: installing Debian's dataset-fashion-mnist"
    $SUDO apt-get update -qq >/dev/null || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "bootstrap: apt could not install dataset-fashion-mnist; pass --data-dir or set FASTMEM_DATA"
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
STAMP="$VENV/.fastmem-installed"
HASH=$(cat setup.py scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  echo "bootstrap: installing torch==2.14.1, torchvision==0.29.1 and fastmem[dev] into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  echo "$HASH" > "$STAMP"
fi
