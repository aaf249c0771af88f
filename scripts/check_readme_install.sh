#!/usr/bin/env bash
# Run the README's install command (its first command, without `westar demo`) in a fresh
# virtual environment laid out as Python >= 3.12 makes them: pip only, no setuptools or
# wheel. Checks that the command installs its own build requirements and that the result
# imports and runs. torch comes from pip's cache when CI installed it before.
# WESTAR_CUDA defaults to 0 here (a CPU build: the point is the install line, and CI
# compile-checks the CUDA sources separately).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
line=$(awk '/^## Quick start/{f=1} f && /^pip install/{print; exit}' README.md)
case "$line" in
  *"&& westar demo") cmd=${line% && westar demo} ;;
  *) echo "check_readme_install: README's first command not found or changed: $line" >&2; exit 1 ;;
esac
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
python -m pip uninstall -q -y setuptools wheel 2>/dev/null || true
if python -c "import setuptools" 2>/dev/null; then
  echo "check_readme_install: could not make a venv without setuptools" >&2; exit 1
fi
echo "check_readme_install: $cmd"
(cd "$work" && cp -r "$OLDPWD" src && cd src && rm -rf build westar_ops/_C*.so && \
  WESTAR_CUDA=${WESTAR_CUDA:-0} PIP_DISABLE_PIP_VERSION_CHECK=1 bash -c "$cmd")
cd "$work"  # not the source tree: import the installed package
python -c "import westar_ops, westar; print('installed:', westar_ops.build_info()['cpu_isa'])"
westar --help > /dev/null
echo "check_readme_install: ok in $(( $(date +%s) - start )) s"
