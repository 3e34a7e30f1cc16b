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
want_helm=1
for option in "$@"; do
  case "$option" in
    --postgres) want_postgres=1 ;;
    --without-helm) want_helm=0 ;;  # CI builds it beside this script (.ci/run)
    *) echo "usage: $0 [--postgres] [--without-helm]" >&2; exit 2 ;;
  esac
done

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

# Helm, for the chart's tests (tests/integration/helm): built once, cached.
if [ "$want_postgres" = 1 ] && [ "$want_helm" = 1 ]; then
  bash "$(dirname "$0")/build-helm.sh"
fi
