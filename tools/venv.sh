#!/usr/bin/env bash
# Run a command inside the project's virtual environment (.venv), creating or
# refreshing it first when pyproject.toml or the constraints file changed.
#
#   bash tools/venv.sh torchrun --standalone --nproc-per-node 2 examples/train_ddp.py
#   bash tools/venv.sh python -m pytest
#
# OVERLAP_SGD_VENV and OVERLAP_SGD_CONSTRAINTS pick another venv and pins, e.g. the oldest
# supported torch:
#
#   OVERLAP_SGD_VENV=.venv-oldest OVERLAP_SGD_CONSTRAINTS=constraints-oldest.txt \
#       bash tools/venv.sh python -m pytest
#
# OVERLAP_SGD_EXTRAS picks the extras installed with the package (default test,plot,accelerate),
# e.g. the documentation and release tools in a venv of their own:
#
#   OVERLAP_SGD_VENV=.venv-docs OVERLAP_SGD_EXTRAS=docs,release bash tools/venv.sh mkdocs serve
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${OVERLAP_SGD_VENV:-.venv}"
case "$venv" in /*) ;; *) venv="$root/$venv" ;; esac
python="${PYTHON:-python3}"
constraints="$root/${OVERLAP_SGD_CONSTRAINTS:-constraints.txt}"
extras="${OVERLAP_SGD_EXTRAS:-test,plot,accelerate}"
stamp="$venv/.overlap-sgd-stamp"
want="$( (cat "$root/pyproject.toml" "$constraints"; echo "extras=$extras") | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
    echo "[venv] creating $venv" >&2
    "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[venv] installing overlap-sgd with the extras $extras (pinned by $(basename "$constraints"))" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints" torch
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints" -e "$root[$extras]"
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
exec "$@"
