#!/usr/bin/env bash
# Run the runtime parity subset against several transformers releases, each in its own virtualenv.
#
#   scripts/compat.sh                  # the default versions below
#   scripts/compat.sh 5.23.0 5.24.0    # or the ones given
#   make compat [COMPAT_VERSIONS="5.23.0 5.24.0"]
#
# For each version X: a venv in $COMPAT_DIR/X (default /tmp/reshard-compat/X) with torch==2.13.0 (the CPU wheel),
# transformers==X and accelerate, then this checkout editable with its `test` extra (a constraints file pins torch
# and transformers==X; a version outside pyproject.toml's range gets the test extra minus transformers). Then:
# - the runtime parity tests (real torchrun processes, reshard's load_model against transformers' own TP load);
# - `scripts/generate_plans.py --out` into a scratch folder, compared with the committed manifests/plans (generated
#   from 5.23) except for their `transformers_version` field: which model types' plans differ, are new or absent
#   (informational: a difference does not fail the run).
# A venv already installed for X from this checkout and this pyproject.toml is reused (COMPAT_FRESH=1 rebuilds it).
# Prints a table; exits 1 when a version inside pyproject.toml's range fails to install or fails a test.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
COMPAT_DIR=${COMPAT_DIR:-/tmp/reshard-compat}
TESTS=(tests/test_runtime_tp.py tests/test_runtime_moe.py tests/test_runtime.py tests/test_replicate_kv.py)
# The supported releases (pyproject.toml's range) and the newest release below it (5.22 lacks `_resolve_parallel_plans`).
DEFAULT_VERSIONS="5.22.2 5.23.0 5.24.0"
if [ $# -gt 0 ]; then VERSIONS="$*"; else VERSIONS=${COMPAT_VERSIONS:-$DEFAULT_VERSIONS}; fi
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

# compare a generated plans folder with the committed one, ignoring each plan's transformers_version
compare_plans() {
    "$1" - "$2" manifests/plans <<'PY'
import json, sys
from pathlib import Path
new, old = (Path(a) for a in sys.argv[1:])
def load(path):
    document = json.loads(path.read_text())
    document.pop("transformers_version", None)
    return document
names_new, names_old = ({p.name[:-5] for p in d.glob("*.json")} - {"INDEX"} for d in (new, old))
differ = sorted(n for n in names_new & names_old if load(new / f"{n}.json") != load(old / f"{n}.json"))
added, gone = sorted(names_new - names_old), sorted(names_old - names_new)
parts = [f"{len(differ)} differ" + (f" ({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''})" if differ else "")]
parts += [f"{len(added)} new ({', '.join(added)})"] if added else []
parts += [f"{len(gone)} absent ({', '.join(gone)})"] if gone else []
print("same as committed" if not (differ or added or gone) else "; ".join(parts))
PY
}

RANGE=$(extra --range)
echo "pyproject.toml: transformers$RANGE; venvs under $COMPAT_DIR; versions: $VERSIONS"
mkdir -p "$COMPAT_DIR"
rows=()
status=0
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
        rows+=("| $version | $in_range | install failed (got $got) | - | $((installed_at - started)) s | - |")
        [ "$in_range" = yes ] && status=1
        continue
    fi
    "$venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}" >>"$log" 2>&1
    pytest_rc=$?
    tested_at=$(date +%s)
    summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "$log" | tail -1 | sed -E 's/^=+ //; s/ =+$//')
    [ -n "$summary" ] || summary="pytest exit $pytest_rc"
    [ "$pytest_rc" -ne 0 ] && [ "$in_range" = yes ] && status=1
    rm -rf "$venv.plans"
    if "$venv/bin/python" scripts/generate_plans.py --out "$venv.plans" >>"$log" 2>&1; then
        plans=$(compare_plans "$venv/bin/python" "$venv.plans" 2>>"$log" || echo "comparison failed")
    else
        plans="generate_plans.py failed"
    fi
    rows+=("| $version | $in_range | $summary | $plans | $((installed_at - started)) s | $((tested_at - installed_at)) s |")
done
echo
echo "transformers compat, $(date +%Y-%m-%d), runtime parity subset: ${TESTS[*]}"
echo "| transformers | in pyproject range | parity tests | built-in plans vs committed (5.23) | install | tests |"
echo "|---|---|---|---|---:|---:|"
printf '%s\n' "${rows[@]}"
exit $status
