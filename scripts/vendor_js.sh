#!/usr/bin/env bash
# Re-fetch the dashboard's vendored JavaScript from npm into server/http/static/.
#
#   bash scripts/vendor_js.sh
#
# The dashboard (server/http_dashboard.py) ships its chart library inside the package, so
# it works with no network and no CDN. This script fetches the pinned npm tarball, checks
# it against the pinned integrity hash (the one the npm registry publishes for that
# version), and copies the files the page uses, with their licence, into server/http/static/.
# Running it again gives byte-identical files; commit them.
#
# Needs npm (only to fetch the tarball: nothing is installed or built).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATIC="$ROOT/server/http/static"

UPLOT_VERSION="1.6.32"
UPLOT_INTEGRITY="sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw=="

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

cd "$WORK"
tarball="$(npm pack --silent "uplot@${UPLOT_VERSION}" 2>/dev/null | tail -n 1)"
actual="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w 0)"
if [[ "$actual" != "$UPLOT_INTEGRITY" ]]; then
    echo "vendor_js.sh: uplot@${UPLOT_VERSION} integrity mismatch:" >&2
    echo "  expected $UPLOT_INTEGRITY" >&2
    echo "  got      $actual" >&2
    exit 1
fi
tar -xzf "$tarball"

mkdir -p "$STATIC"
cp package/dist/uPlot.iife.min.js "$STATIC/uPlot.iife.min.js"
cp package/dist/uPlot.min.css "$STATIC/uPlot.min.css"
cp package/LICENSE "$STATIC/uPlot.LICENSE"
echo "vendored uplot@${UPLOT_VERSION} into ${STATIC#"$ROOT"/}" >&2
