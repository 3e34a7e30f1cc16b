#!/usr/bin/env bash
# Installs the system pieces portal-sync needs, from Debian's packages, when missing:
# a JDK 17 and Maven (the local Kafka broker), and with --postgres the tests' servers and
# tools: PostgreSQL, Prometheus (promtool checks the alert rules; a real Prometheus scrapes
# the pipeline in an integration test), and Helm (the chart's checks), built from source
# with Go into the user's cache dir once (~/.cache/portal-sync/bin/helm).
# Node.js with --postgres too: it checks that the published JSON Schemas' patterns compile
# in ECMA-262 as producers' validators read them; systemd's systemd-analyze, which checks
# the units in deploy/systemd. (The Makefile fetches the Kafka jars.)
set -euo pipefail

want_postgres=0
[ "${1:-}" = "--postgres" ] && want_postgres=1

missing=()
command -v java >/dev/null || missing+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null || missing+=(maven)
command -v python3.11 >/dev/null || missing+=(python3.11)
# Debian's python3.11 comes without its venv module (a package of its own, in no cloud
# image): `python3.11 -m venv` then fails on ensurepip.
python3.11 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3.11-venv)
if [ "$want_postgres" = 1 ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
if [ "$want_postgres" = 1 ] && ! { command -v prometheus && command -v promtool; } >/dev/null; then
  missing+=(prometheus)
fi
if [ "$want_postgres" = 1 ] && ! command -v node >/dev/null; then
  missing+=(nodejs)
fi
# systemd-analyze checks the systemd units offline (tests/integration/deploy).
if [ "$want_postgres" = 1 ] && ! command -v systemd-analyze >/dev/null; then
  missing+=(systemd)
fi

as_root=()
[ "$(id -u)" = 0 ] || as_root=(sudo)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian starts and enables a server package's service as it installs it: Prometheus on
# 0.0.0.0:9090 with no authentication, PostgreSQL's `main` cluster. portal-sync uses neither
# (its tests and the demo start their own servers on 127.0.0.1), so the ones this script
# installed are stopped and disabled again.
services=()
for package in "${missing[@]}"; do
  case "$package" in postgresql | prometheus) services+=("$package") ;; esac
done
for service in "${services[@]}"; do
  if [ -d /run/systemd/system ]; then
    "${as_root[@]}" systemctl disable --now "$service" >/dev/null 2>&1 ||
      echo "warning: could not stop and disable the $service service Debian started" >&2
  elif [ -x "/etc/init.d/$service" ]; then
    "${as_root[@]}" "/etc/init.d/$service" stop >/dev/null 2>&1 || true
    "${as_root[@]}" update-rc.d "$service" disable >/dev/null 2>&1 || true
  fi
done

java_major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
if [ "${java_major:-0}" -lt 17 ]; then
  echo "Java 17 or newer is required (found ${java_major:-none})" >&2
  exit 1
fi

# Helm, for the chart's tests (tests/integration/helm): `go install` of the release's module
# with the version stamps of Helm's own Makefile (its version; the Kubernetes version of its
# client-go v0.37.0 as the default capabilities), cached: nothing is rebuilt while the
# cached binary reports this version.
HELM_VERSION=v3.22.0
HELM_K8S_MINOR=37
if [ "$want_postgres" = 1 ]; then
  helm_bin="${XDG_CACHE_HOME:-$HOME/.cache}/portal-sync/bin"
  if [ "$("$helm_bin/helm" version --template '{{.Version}}' 2>/dev/null)" != "$HELM_VERSION" ]; then
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
  fi
fi
