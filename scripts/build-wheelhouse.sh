#!/bin/bash
# Build wheels for amoskys and every dependency into OUTDIR, so hosts install with
# `pip install --no-index --find-links` and need no package index.
# Usage: scripts/build-wheelhouse.sh OUTDIR    (PYTHON: the build interpreter, default the project venv)
# Cached: OUTDIR/.stamp holds a hash of the sources; when it matches, prints "wheelhouse cached" and exits.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:?usage: build-wheelhouse.sh OUTDIR}
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || { echo "no build interpreter at $python: run 'make' (the project venv) first" >&2; exit 2; }
stamp=$(cd "$root" && find src/amoskys proto pyproject.toml hatch_build.py scripts/build-wheelhouse.sh -type f \
          ! -name '*_pb2*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp" ]; then echo "wheelhouse cached: $out"; exit 0; fi
mkdir -p "$(dirname "$out")"
tmp=$(mktemp -d "$out.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# --no-build-isolation: the project venv already has the build backend and the protobuf generators.
"$python" -m pip wheel --quiet --no-build-isolation --wheel-dir "$tmp" "$root" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)   # a local find-links setting is noisy
(cd "$tmp" && sha256sum -- *.whl > SHA256SUMS)   # what hosts compare with what they installed
# one file to ship: copying 25 files one by one costs seconds per host
(cd "$tmp" && tar -cf wheelhouse.tar -- *.whl SHA256SUMS)
echo "$stamp" > "$tmp/.stamp"
chmod 0755 "$tmp"
rm -rf "$out"; mv "$tmp" "$out"; trap - EXIT
echo "wheelhouse built: $out ($(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1))"
