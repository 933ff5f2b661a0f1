#!/bin/sh
# Install Ferry as a systemd service on this host (run as root from a Ferry checkout):
#   1. a virtualenv at <prefix>/venv (default /opt/ferry/venv) with Ferry and the `cpu` extra
#      (onnxruntime) or, with --gpu, the `gpu` extra (onnxruntime-gpu);
#   2. `ferry install-systemd` (daemon/systemd_install.py): the `ferry` system user,
#      /etc/systemd/system/ferry.service (+ the GPU drop-in with --gpu) and
#      /etc/ferry/ferry.toml unless one exists.
# pip honours PIP_INDEX_URL / PIP_EXTRA_INDEX_URL as usual (e.g. a PyTorch CPU wheel index
# on CPU-only hosts, or an internal mirror).
set -eu

usage() {
    cat <<EOF
usage: install.sh [--gpu] [--prefix DIR] [--python PYTHON] [--user NAME]
  --gpu          install the gpu extra and the /dev/nvidia* drop-in
  --prefix DIR   where the virtualenv goes (default /opt/ferry; the unit runs DIR/venv/bin/ferry)
  --python PY    interpreter that creates the virtualenv (default python3, needs >= 3.11)
  --user NAME    system user the service runs as (default ferry)
EOF
}

gpu=0
prefix=/opt/ferry
python=python3
user=ferry
while [ $# -gt 0 ]; do
    case "$1" in
        --gpu) gpu=1 ;;
        --prefix) [ $# -ge 2 ] || { usage >&2; exit 2; }; prefix=$2; shift ;;
        --python) [ $# -ge 2 ] || { usage >&2; exit 2; }; python=$2; shift ;;
        --user) [ $# -ge 2 ] || { usage >&2; exit 2; }; user=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

case "$prefix" in
    /*) ;;
    *) echo "install.sh: --prefix must be an absolute path" >&2; exit 2 ;;
esac
if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (writes $prefix, /etc/systemd/system and /etc/ferry)" >&2
    exit 1
fi

repo=$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)
venv=$prefix/venv
extra=cpu
if [ "$gpu" -eq 1 ]; then extra=gpu; fi

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --upgrade pip
"$venv/bin/python" -m pip install "$repo[$extra]"

# `ferry install-systemd`, run as its module so every option is there whatever the CLI wires.
# The templates come from this checkout: a wheel install does not carry systemd/.
set -- --python "$venv/bin/python" --templates "$repo/systemd" --user "$user"
if [ "$gpu" -eq 1 ]; then set -- "$@" --gpu; fi
"$venv/bin/python" -m daemon.systemd_install "$@"

echo
echo "Ferry is installed. Start it with:"
echo "  systemctl daemon-reload && systemctl enable --now ferry"
