#!/usr/bin/env bash
# Installs the system pieces portal-sync needs, from Debian's packages, when missing:
# a JDK 17 and Maven (the local Kafka broker), and with --postgres the tests' servers:
# PostgreSQL, and Prometheus (promtool checks the alert rules; a real Prometheus scrapes
# the pipeline in an integration test).
# Then fetches the Kafka jars once through Maven into the user's cache dir.
set -euo pipefail

want_postgres=0
[ "${1:-}" = "--postgres" ] && want_postgres=1

missing=()
command -v java >/dev/null || missing+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null || missing+=(maven)
command -v python3.11 >/dev/null || missing+=(python3.11 python3.11-venv)
if [ "$want_postgres" = 1 ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
if [ "$want_postgres" = 1 ] && ! { command -v prometheus && command -v promtool; } >/dev/null; then
  missing+=(prometheus)
fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

java_major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
if [ "${java_major:-0}" -lt 17 ]; then
  echo "Java 17 or newer is required (found ${java_major:-none})" >&2
  exit 1
fi
