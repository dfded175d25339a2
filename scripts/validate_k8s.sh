#!/usr/bin/env bash
# CI: validates every Kubernetes manifest under k8s/ against the Kubernetes JSON schemas, strictly (an unknown or
# misspelt field fails, as `kubectl apply --validate=strict` would), for the oldest and the newest Kubernetes version
# tandem supports. The schemas ship inside the PyPI package kubernetes-validate, installed into ./.venv when it is
# missing there, so no cluster and no network beyond PyPI is needed. Arguments: manifests to check instead of k8s/*.yaml.
# Set KUBERNETES_VERSIONS to check other versions. The last line reads `validate_k8s: N passed, M failed`.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned: a new release bundles new schemas, and what passes should change only with a commit.
KUBERNETES_VALIDATE='kubernetes-validate==1.37.0'
KUBERNETES_VERSIONS=${KUBERNETES_VERSIONS:-"1.30.0 1.37.0"}

# Python with kubernetes-validate: ./.venv as a venv, or (no venv module, or a venv without pip) a plain --target
# folder on PYTHONPATH.
if [ -x .venv/bin/python ] && .venv/bin/python -c 'import kubernetes_validate' 2>/dev/null; then
  PYTHON=.venv/bin/python
elif [ -d .venv/kubernetes_validate ] && PYTHONPATH="$PWD/.venv" python3 -c 'import kubernetes_validate' 2>/dev/null; then
  PYTHON=python3
  export PYTHONPATH="$PWD/.venv${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "validate_k8s.sh: installing $KUBERNETES_VALIDATE from PyPI into .venv" >&2
  if { [ -x .venv/bin/python ] || python3 -m venv .venv 2>/dev/null; } \
      && .venv/bin/python -m pip --version >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "$KUBERNETES_VALIDATE"
    PYTHON=.venv/bin/python
  else
    # No venv module (Debian without python3-venv leaves a venv without pip): a plain target folder works too.
    python3 -m pip install --quiet --disable-pip-version-check --target .venv "$KUBERNETES_VALIDATE"
    PYTHON=python3
    export PYTHONPATH="$PWD/.venv${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PYTHON" -c 'import kubernetes_validate' \
    || { echo "validate_k8s.sh: could not install $KUBERNETES_VALIDATE" >&2; exit 1; }
fi

if [ "$#" -gt 0 ]; then
  MANIFESTS=("$@")
else
  MANIFESTS=(k8s/*.yaml)
fi
[ -e "${MANIFESTS[0]}" ] || { echo "validate_k8s.sh: no manifests to validate" >&2; exit 1; }

passed=0
failed=0
for version in $KUBERNETES_VERSIONS; do
  for manifest in "${MANIFESTS[@]}"; do
    # --strict: a property the schema does not know is an error, not ignored.
    if "$PYTHON" -m kubernetes_validate --strict --quiet --kubernetes-version "$version" "$manifest"; then
      echo "validate_k8s.sh: $manifest is valid for Kubernetes $version" >&2
      passed=$((passed + 1))
    else
      echo "validate_k8s.sh: $manifest is NOT valid for Kubernetes $version" >&2
      failed=$((failed + 1))
    fi
  done
done
echo "validate_k8s: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
