#!/usr/bin/env bash
# Set up (or reuse) a virtual environment with emascope and its test extras, install Chromium for
# the browser test when possible, and run the whole test suite. Extra arguments go to pytest.
#   bash tests/run.sh                # everything
#   bash tests/run.sh -k bank        # a subset
# Environment: EMASCOPE_VENV (default .venv), EMASCOPE_REQUIRE_BROWSER=1 makes a missing
# Chromium a failure instead of a skip (CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${EMASCOPE_VENV:-.venv}"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q -e ".[test]"

if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/run.sh: installing Debian's chromium for the browser test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "tests/run.sh: no chromium and cannot apt-get it; the browser test will be skipped" >&2
  fi
fi

report="$(mktemp -d)/junit.xml"
set +e
"$venv/bin/python" -m pytest -ra --junitxml="$report" "$@"
status=$?
set -e
# Never pass with zero tests run.
ran=$("$venv/bin/python" - "$report" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    print(0); sys.exit()
suites = [root] if root.tag == "testsuite" else list(root)
print(sum(int(s.get("tests", 0)) - int(s.get("skipped", 0)) for s in suites))
PY
)
echo "tests/run.sh: pytest exit status $status, $ran tests ran (not skipped)"
if [ "$status" -ne 0 ]; then exit "$status"; fi
if [ "${ran:-0}" -le 0 ]; then echo "tests/run.sh: no tests ran: failing" >&2; exit 1; fi
