#!/usr/bin/env bash
# Build the wheel and the sdist, check them with twine, install the wheel into a fresh venv next
# to the pinned torch and run tools/wheel_smoke.py from outside the checkout.
#
#   bash tools/wheel_smoke.sh            # dist/ is rebuilt; the venv is a temporary one
#
# The build tools come from the docs venv (.venv-docs, the docs and release extras), created by
# tools/venv.sh when missing. OVERLAP_SGD_CONSTRAINTS picks the pins (constraints.txt).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
constraints="$root/${OVERLAP_SGD_CONSTRAINTS:-constraints.txt}"
python="${PYTHON:-python3}"
tools() { OVERLAP_SGD_VENV=.venv-docs OVERLAP_SGD_EXTRAS=docs,release bash "$root/tools/venv.sh" "$@"; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# 1. The wheel and the sdist, built from a copy of what a clone would hold (tracked files and
#    untracked ones git does not ignore): leftovers of an editable install (*.egg-info, build/)
#    would otherwise feed files into the wheel that its package list leaves out.
mkdir "$work/src"
(cd "$root" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf -) | tar -xf - -C "$work/src"
rm -rf "$root/dist"
tools python -m build --outdir "$root/dist" "$work/src"
tools twine check --strict "$root"/dist/*
wheel="$(ls "$root"/dist/*.whl)"

# 2. A fresh venv: the pinned torch, then the wheel (its other dependencies pinned too).
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints" torch
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints" "$wheel"

# 3. The smoke test, from a directory where `import overlap_sgd` can only find the wheel.
cp "$root/tools/wheel_smoke.py" "$work/"
cd "$work"
"$work/venv/bin/python" -I wheel_smoke.py --expect "$root/overlap_sgd"
