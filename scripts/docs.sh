#!/usr/bin/env bash
# Build the documentation site (Sphinx, furo theme) into docs/_build/html.
#
#   bash scripts/docs.sh        # from any directory; then open docs/_build/html/index.html
#
# Warnings are errors: the script exits non-zero if Sphinx warns about anything (a broken
# reference, bad markup in a page or a docstring, a page missing from the table of
# contents), after reporting every warning (--keep-going). Sphinx, furo and
# sphinx-argparse come with `pip install -e .[test]`; the package must be importable
# (the API and CLI references are generated from its code).
#
# The interpreter is $PYTHON if set, else python3, else python. WKR_DOCS_OUT overrides
# the output directory. Each build starts from scratch (-E), so nothing stale survives.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ -n "${PYTHON:-}" ]]; then
    :
elif command -v python3 >/dev/null 2>&1; then
    PYTHON=python3
else
    PYTHON=python
fi

# The pages that include files written outside docs/: say which is missing, plainly,
# before Sphinx does it in the middle of its output.
included=(
    README.rst
    example/iris/README.rst
    example/keras/README.rst
    example/sentence_embedding/README.rst
    example/async_jobs/README.rst
    deploy/README.rst
)
missing=0
for file in "${included[@]}"; do
    if [[ ! -f "$file" ]]; then
        echo "docs.sh: error: $file is missing (the site includes it)" >&2
        missing=1
    fi
done
if [[ "$missing" -ne 0 ]]; then
    exit 1
fi

if ! "$PYTHON" -c "import sphinx, furo, sphinxarg" 2>/dev/null; then
    echo "docs.sh: error: Sphinx, furo or sphinx-argparse is not installed" \
         "(pip install -e .[test])" >&2
    exit 1
fi

OUT="${WKR_DOCS_OUT:-docs/_build/html}"
# The parsers read defaults from the environment (-token, -auth_token default to
# $WKR_AUTH_TOKEN): build with no WKR_* variable set, so no secret of this shell can
# end up in the pages and every build shows the same defaults.
unset_args=()
for name in $(compgen -e); do
    if [[ "$name" == WKR_* || "$name" == DRUCKER_* ]]; then
        unset_args+=(-u "$name")
    fi
done

env "${unset_args[@]}" "$PYTHON" -m sphinx -W --keep-going -E -q -b html docs "$OUT"
echo "docs.sh: built $OUT/index.html"
