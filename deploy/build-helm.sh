#!/usr/bin/env bash
# Helm, for the chart's tests (tests/integration/helm): `go install` of the release's module
# with the version stamps of Helm's own Makefile (its version; the Kubernetes version of its
# client-go v0.37.0 as the default capabilities), into the user's cache dir
# (~/.cache/portal-sync/bin/helm), cached: nothing is rebuilt while the cached binary reports
# this version. `deploy/install-system.sh --postgres` runs it; it needs Go alone, not the
# system packages, so CI starts it first, beside them (.ci/run): on a fresh machine the
# build takes about three minutes of both cores.
set -euo pipefail

HELM_VERSION=v3.22.0
HELM_K8S_MINOR=37
helm_bin="${XDG_CACHE_HOME:-$HOME/.cache}/portal-sync/bin"
if [ "$("$helm_bin/helm" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]; then
  exit 0
fi
go=$(command -v go || true)
[ -z "$go" ] && [ -x /usr/local/go/bin/go ] && go=/usr/local/go/bin/go  # not on PATH
if [ -z "$go" ]; then
  echo "Go is required to build Helm $HELM_VERSION (go install); install Go 1.26 or newer" >&2
  exit 1
fi
echo "building Helm $HELM_VERSION into $helm_bin (go install, a few minutes once)"
mkdir -p "$helm_bin"
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for package in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ldflags+=" -X $package.k8sVersionMajor=1 -X $package.k8sVersionMinor=$HELM_K8S_MINOR"
done
GOBIN="$helm_bin" GOFLAGS=-buildvcs=false CGO_ENABLED=0 \
  "$go" install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
"$helm_bin/helm" version --template 'built Helm {{.Version}}{{"\n"}}'
