#!/usr/bin/env bash
# The test command: set up .venv when needed, then run the whole suite (extra arguments go to pytest).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || exit 1
VENV=${VENV:-.venv}
# timm's own model tests for the installed timm (tests/timm_contract/): fetched once from PyPI
"$VENV/bin/python" scripts/fetch_timm_tests.py || exit 1
# Fashion-MNIST for the learning tests (the Debian package when root with apt; never fatal); they fail rather than
# skip when no source works (tests/conftest.py says how to get it); DCLS_TIMM_REQUIRE_DATA=0 lets them skip
bash scripts/get_fashion_mnist.sh test
export DCLS_TIMM_REQUIRE_DATA=${DCLS_TIMM_REQUIRE_DATA-1}
"$VENV/bin/python" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "[test] pytest collected no tests: failing on purpose" >&2
fi
exit "$rc"
