#!/usr/bin/env bash
# ci.sh — the web runtime's CI, run from the repository root with the project's .venv active:
#   bash runtimes/web/ci.sh
# Installs Chromium (Debian's package) only if /usr/bin/chromium is absent and the npm packages (npm ci;
# no browser is downloaded), exports the bundles (a random tiny model fp32, the demo model fp32 and int8,
# in parallel, in a temporary folder), writes the Python runtime's fixtures, then runs the Node unit tests
# and the tests in headless Chromium. Exits non-zero on any failure. Screenshots: $MEISSONIC_WEB_OUT
# (default: runtimes/web/test-output/). Knobs: MEISSONIC_WEB_PARITY_STEPS (demo parity steps, 32),
# MEISSONIC_WEB_DEMO_STEPS (demo page steps, 16), MEISSONIC_WEB_INT8=0 (skip the int8 export: the demo page
# test then runs on the fp32 bundle; saves about a third of the export time).
set -euo pipefail
cd "$(dirname "$0")/../.."
web=runtimes/web
started=$(date +%s)
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
elapsed() { echo "[web ci $(( $(date +%s) - started ))s] $*"; }

command -v meissonic-edge >/dev/null || { echo "error: meissonic-edge not found: activate the project's .venv first" >&2; exit 1; }

# Exports run in the background while the installs go on (each mostly uses one core).
mkdir -p "$work/bundles"
meissonic-edge make-random "$work/tiny-model" --preset tiny >"$work/tiny.log" 2>&1 \
    && meissonic-edge export "$work/tiny-model" "$work/bundles/tiny" --quiet >>"$work/tiny.log" 2>&1 &
pids+=($!)
meissonic-edge export meissonic_edge/demo_model "$work/bundles/demo-fp32" --quiet >"$work/demo-fp32.log" 2>&1 &
pids+=($!)
names=(tiny demo-fp32)
if [ "${MEISSONIC_WEB_INT8:-1}" != 0 ]; then  # MEISSONIC_WEB_INT8=0: the demo page test uses the fp32 bundle
    meissonic-edge export meissonic_edge/demo_model "$work/bundles/demo-int8" --precision int8 --quiet >"$work/demo-int8.log" 2>&1 &
    pids+=($!)
    names+=(demo-int8)
fi

if [ ! -x /usr/bin/chromium ]; then
    elapsed "installing chromium (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
elapsed "npm ci"
(cd "$web" && npm ci --no-audit --no-fund --loglevel=error)

for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        echo "error: exporting the ${names[$i]} bundle failed:" >&2
        cat "$work/${names[$i]}.log" >&2
        exit 1
    fi
done
pids=()
elapsed "bundles exported"

fixtures="$work/fixtures"
python "$web/scripts/make_fixtures.py" "$fixtures" --tiny "$work/bundles/tiny" --demo "$work/bundles/demo-fp32" \
    --demo-steps "${MEISSONIC_WEB_PARITY_STEPS:-32}" 2>/dev/null
elapsed "fixtures written"

export MEISSONIC_WEB_FIXTURES="$fixtures" MEISSONIC_WEB_BUNDLES="$work/bundles"
export MEISSONIC_WEB_OUT="${MEISSONIC_WEB_OUT:-$PWD/$web/test-output}"
export MEISSONIC_WEB_DEMO_STEPS="${MEISSONIC_WEB_DEMO_STEPS:-16}"
cd "$web"
elapsed "node unit tests"
node --test test/unit/
elapsed "chromium tests"
node --test --test-concurrency=1 test/browser/
elapsed "done: web runtime tests passed"
