#!/usr/bin/env bash
# Idempotent set-up: Debian packages (when apt is usable), a virtualenv in .venv, and fastmem with
# its dev extras. Re-running is cheap: each step is skipped when its result is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FASTMEM_VENV:-.venv}
PYTHON=${PYTHON:-python3}

# Debian packages, where we may use apt: Fashion-MNIST (the embedded default), the libraries FFCV's
# C extension builds against (found through pkg-config: opencv4, libturbojpeg), and Slurm with munge (the
# tests of --executor slurm start a one-node cluster: tests/slurm_cluster.py). Only missing ones.
APT_WANT=()
[ -d /usr/share/datasets/fashion-mnist ] || APT_WANT+=(dataset-fashion-mnist)
if ! { command -v pkg-config >/dev/null 2>&1 && pkg-config --exists opencv4 libturbojpeg; }; then
  APT_WANT+=(pkg-config libopencv-dev libturbojpeg0-dev)
fi
SBIN_PATH="$PATH:/usr/sbin:/usr/local/sbin:/sbin"
for prog in slurmctld slurmd sbatch srun; do
  PATH="$SBIN_PATH" command -v "$prog" >/dev/null 2>&1 || { APT_WANT+=(slurm-wlm); break; }
done
PATH="$SBIN_PATH" command -v munged >/dev/null 2>&1 || APT_WANT+=(munge)
if [ ${#APT_WANT[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    echo "bootstrap: apt-get install ${APT_WANT[*]}"
    $SUDO apt-get update -qq >/dev/null || true
    for pkg in "${APT_WANT[@]}"; do  # one at a time: a missing one must not block the others
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$pkg" >/dev/null \
        || echo "bootstrap: apt could not install $pkg"
    done
  fi
fi
[ -d /usr/share/datasets/fashion-mnist ] \
  || echo "bootstrap: no Debian dataset-fashion-mnist; pass --data-dir or set FASTMEM_DATA"
PATH="$SBIN_PATH" command -v slurmctld >/dev/null 2>&1 && PATH="$SBIN_PATH" command -v munged >/dev/null 2>&1 \
  || echo "bootstrap: no Slurm (slurm-wlm, munge): the tests marked slurm will skip"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
STAMP="$VENV/.fastmem-installed"
HASH=$(cat setup.py scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  # Extras: dev (tests, lint), dali and ffcv (pipeline backends whose tests run in CI). DALI is a
  # ~0.9 GB wheel that also runs CPU-only; FFCV 1.0.2 compiles a C extension against the apt
  # libraries above (build isolation is fine: setuptools supplies distutils).
  EXTRAS="dev,dali"
  if pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then
    EXTRAS="$EXTRAS,ffcv"
  else
    echo "bootstrap: pkg-config finds no opencv4/libturbojpeg: skipping fastmem[ffcv] (its tests will skip)"
  fi
  echo "bootstrap: installing torch==2.14.1, torchvision==0.29.1 and fastmem[$EXTRAS] into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
  # Without ffcv, leave no stamp: the next run tries again once the libraries are there.
  case ",$EXTRAS," in *,ffcv,*) echo "$HASH" > "$STAMP" ;; esac
fi
