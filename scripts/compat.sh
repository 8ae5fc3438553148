#!/usr/bin/env bash
# Run the runtime parity subset, and the model-type matrix for the types whose built-in plan a release changes or
# adds, against several transformers releases, each in its own virtualenv.
#
#   scripts/compat.sh                  # the default versions below (pyproject.toml's range)
#   scripts/compat.sh 5.23.0 5.24.0    # or the ones given
#   make compat [COMPAT_VERSIONS="5.23.0 5.24.0"]
#   COMPAT_EXCEPT_PINNED=1 make compat   # all but the pinned release (constraints.txt), which `make test-all` covers
#
# For each version X: a venv in $COMPAT_DIR/X (default /tmp/reshard-compat/X) with torch==2.13.0 (the CPU wheel),
# transformers==X and accelerate, then this checkout editable with its `test` extra (a constraints file pins torch
# and transformers==X; a version outside pyproject.toml's range gets the test extra minus transformers). Then:
# - the runtime parity tests (real torchrun processes, reshard's load_model against transformers' own TP load, and
#   tests/test_versions.py: artifacts made for another release of the range, refused or loaded at parity);
# - the model-type matrix (tests/test_matrix.py, RESHARD_MATRIX_TYPES) for the supported types whose built-in plan
#   under X differs from the pinned release's (constraints.txt; `make test-all` runs the full matrix under it);
# - `scripts/generate_plans.py --check`: are manifests/plans/<X's minor> what X generates (a release outside the
#   range has no folder: the line says what it would change; informational there).
# A venv already installed for X from this checkout and this pyproject.toml is reused (COMPAT_FRESH=1 rebuilds it).
# Prints a table; exits 1 when a version inside pyproject.toml's range fails to install or fails a test.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
COMPAT_DIR=${COMPAT_DIR:-/tmp/reshard-compat}
TESTS=(tests/test_runtime_tp.py tests/test_runtime_moe.py tests/test_runtime.py tests/test_replicate_kv.py
    tests/test_versions.py)
# The supported releases (pyproject.toml's range). Releases outside it can be given (`scripts/compat.sh 5.22.2`):
# reshard has no plans for them, so load_model refuses every artifact there.
DEFAULT_VERSIONS="5.23.0 5.24.0"
PINNED=$(sed -n 's/^transformers==//p' constraints.txt)
if [ $# -gt 0 ]; then VERSIONS="$*"; else VERSIONS=${COMPAT_VERSIONS:-$DEFAULT_VERSIONS}; fi
# COMPAT_EXCEPT_PINNED=1 (CI, after `make test-all`, which ran the whole suite and matrix under the pinned release):
# the other releases only
skipped_pinned=no
if [ "${COMPAT_EXCEPT_PINNED:-0}" = 1 ] && [[ " $VERSIONS " == *" $PINNED "* ]]; then
    VERSIONS=$(echo " $VERSIONS " | sed "s/ $PINNED / /; s/^ *//; s/ *$//")
    skipped_pinned=yes
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# the test extra's requirements, one a line; `--range` prints transformers' specifier instead (e.g. ">=5.23,<5.25")
extra() {
    "$PYTHON" - "$@" <<'PY'
import re, sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]
is_tf = lambda r: re.match(r"transformers\b", r)
if sys.argv[1:] == ["--range"]:
    print(next(re.sub(r"^transformers", "", r).strip() for r in extra if is_tf(r)))
else:
    print("\n".join(r for r in extra if not is_tf(r)))
PY
}

# the supported model types (the matrix builds them) whose built-in plan under the venv's release differs from the
# pinned release's, comma-separated
matrix_types() {
    "$1" - "$PINNED" <<'PY'
import sys
sys.path.insert(0, ".")
from reshard.manifests.plans import plan_sets, plans_version
from tests.helpers.tester_configs import SKIPPED, supported_types
sets, here = plan_sets(), plans_version()
print(",".join(t for t in supported_types() if t not in SKIPPED and sets.plan(t, here) != sets.plan(t, sys.argv[1])))
PY
}

RANGE=$(extra --range)
echo "pyproject.toml: transformers$RANGE; venvs under $COMPAT_DIR; versions: $VERSIONS"
mkdir -p "$COMPAT_DIR"
rows=()
status=0
[ "$skipped_pinned" = yes ] && rows+=("| $PINNED | yes | the pinned release: run by \`make test-all\` | - | - | - | - |")
for version in $VERSIONS; do
    venv="$COMPAT_DIR/$version"
    log="$COMPAT_DIR/$version.log"
    started=$(date +%s)
    echo "== transformers $version (log: $log)"
    : >"$log"
    in_range=$("$PYTHON" - "$version" "$RANGE" <<'PY'
import sys
try:
    from packaging.specifiers import SpecifierSet
except ImportError:
    from pip._vendor.packaging.specifiers import SpecifierSet
print("yes" if sys.argv[1] in SpecifierSet(sys.argv[2]) else "no")
PY
    )
    constraints="$COMPAT_DIR/constraints-$version.txt"
    printf 'torch==2.13.0\ntransformers==%s\n' "$version" >"$constraints"
    installed=ok
    stamp="$version $ROOT $(sha1sum pyproject.toml | cut -c1-12)"
    if [ "${COMPAT_FRESH:-0}" = 1 ] || [ "$(cat "$venv/.compat-stamp" 2>/dev/null)" != "$stamp" ]; then
        {
            rm -rf "$venv" && "$PYTHON" -m venv "$venv" &&
                "$venv/bin/python" -m pip install --quiet torch==2.13.0 &&
                "$venv/bin/python" -m pip install --quiet -c "$constraints" "transformers==$version" accelerate &&
                if [ "$in_range" = yes ]; then
                    "$venv/bin/python" -m pip install --quiet -c "$constraints" -e "$ROOT[test]"
                else
                    # outside the declared range pip would refuse `.[test]`: its requirements but transformers
                    mapfile -t requirements < <(extra)
                    "$venv/bin/python" -m pip install --quiet -c "$constraints" "${requirements[@]}" &&
                        "$venv/bin/python" -m pip install --quiet --no-deps -e "$ROOT"
                fi
        } >>"$log" 2>&1 || installed=failed
        [ "$installed" = ok ] && echo "$stamp" >"$venv/.compat-stamp"
    else
        echo "reusing $venv" >>"$log"
    fi
    installed_at=$(date +%s)
    got=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)" 2>/dev/null || echo "?")
    if [ "$installed" != ok ] || [ "$got" != "$version" ]; then
        rows+=("| $version | $in_range | install failed (got $got) | - | - | $((installed_at - started)) s | - |")
        [ "$in_range" = yes ] && status=1
        continue
    fi
    "$venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}" >>"$log" 2>&1
    pytest_rc=$?
    summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "$log" | tail -1 | sed -E 's/^=+ //; s/ =+$//')
    [ -n "$summary" ] || summary="pytest exit $pytest_rc"
    [ "$pytest_rc" -ne 0 ] && [ "$in_range" = yes ] && status=1
    matrix="-"
    types=$(matrix_types "$venv/bin/python" 2>>"$log")
    if [ -n "$types" ]; then
        echo "matrix: $types" >>"$log"
        RESHARD_MATRIX=1 RESHARD_MATRIX_TYPES=$types "$venv/bin/python" -m pytest -q -p no:cacheprovider \
            tests/test_matrix.py >>"$log" 2>&1
        matrix_rc=$?
        matrix=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped|xfailed)' "$log" | tail -1 | sed -E 's/^=+ //; s/ =+$//')
        matrix="${types//,/, }: ${matrix:-pytest exit $matrix_rc}"
        [ "$matrix_rc" -ne 0 ] && [ "$in_range" = yes ] && status=1
    fi
    tested_at=$(date +%s)
    "$venv/bin/python" scripts/generate_plans.py --check >"$venv.plans.txt" 2>&1
    plans_rc=$?
    cat "$venv.plans.txt" >>"$log"
    plans=$(grep -E '^transformers ' "$venv.plans.txt" || echo "generate_plans.py failed")
    [ "$plans_rc" -ne 0 ] && plans="$plans; stale or absent: manifests/plans/${version%.*}" && [ "$in_range" = yes ] && status=1
    rows+=("| $version | $in_range | $summary | $matrix | $plans | $((installed_at - started)) s | $((tested_at - installed_at)) s |")
done
echo
echo "transformers compat, $(date +%Y-%m-%d), runtime parity subset: ${TESTS[*]}; matrix: types whose plan differs from $PINNED's"
echo "| transformers | in pyproject range | parity tests | matrix | built-in plans | install | tests |"
echo "|---|---|---|---|---|---:|---:|"
printf '%s\n' "${rows[@]}"
exit $status
