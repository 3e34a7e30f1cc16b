"""Sync-lag observability: consumer lag, source freshness, probes, dashboards and alerts."""
