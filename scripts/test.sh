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
# one pytest worker per core (pytest-xdist), each with one torch thread: the tests are small, so two single-threaded
# workers finish the suite in ~0.57x the time of one two-threaded run; DCLS_TIMM_TEST_WORKERS=0 runs it serially
workers=${DCLS_TIMM_TEST_WORKERS-$(nproc 2>/dev/null || echo 1)}
parallel=()
if [ "$workers" -gt 1 ] && "$VENV/bin/python" -c 'import xdist' 2>/dev/null; then
    parallel=(-n "$workers")
    export OMP_NUM_THREADS=${OMP_NUM_THREADS-1}
fi
"$VENV/bin/python" -m pytest "${parallel[@]}" "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "[test] pytest collected no tests: failing on purpose" >&2
fi
exit "$rc"
