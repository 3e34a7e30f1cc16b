"""The Grafana dashboard of portal-sync, as code: `python -m observability.deploy` writes
`deploy/grafana/dashboards/portal-sync.json` (a test fails when the file is stale)."""

from __future__ import annotations

from typing import Any

from observability.alerts import DEFAULT, JOBS, Thresholds, _edge

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'source=~"$source",entity=~"$entity"'
RATE = "[$__rate_interval]"
PHASE = "portal_sync_batch_phase_duration_seconds"
STATUS_NAMES = ("OK", "WARN", "STALL", "STOP")
STATUS_COLORS = ("green", "yellow", "red", "dark-red")
NO_DATA = "no data"


def _target(expr: str, legend: str = "", ref: str = "A", table: bool = False) -> dict[str, Any]:
    target: dict[str, Any] = {
        "datasource": DATASOURCE,
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
    }
    if table:
        target.update({"format": "table", "instant": True, "range": False})
    return target


def _panel(
    kind: str,
    title: str,
    grid: tuple[int, int, int, int],
    targets: list[dict[str, Any]],
    unit: str = "short",
    **extra: Any,
) -> dict[str, Any]:
    x, y, w, h = grid
    panel: dict[str, Any] = {
        "type": kind,
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
    }
    panel.update(extra)
    return panel


def _quantiles(metric: str, by: str, selector: str = "") -> list[dict[str, Any]]:
    legend = "{{" + by + "}} " if by else ""
    group = f"{by}, le" if by else "le"
    return [
        _target(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{selector}{RATE})))",
            f"{legend}p{round(q * 100)}",
            ref,
        )
        for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))
    ]


def _freshness(t: Thresholds) -> dict[str, Any]:
    change = 'portal_sync_source_last_change_timestamp_seconds{source=~"$source"}'
    applied = 'portal_sync_source_last_applied_timestamp_seconds{source=~"$source"}'
    steps = [{"color": "green", "value": None}, {"color": "red", "value": t.stale_after_seconds}]
    return _panel(
        "table",
        f"Freshness per source (red: stale, no change for {t.stale_after_seconds:g}s)",
        (12, 0, 12, 10),
        [
            _target(f"time() - max by (source) ({change})", "", "A", table=True),
            _target(f"time() - max by (source) ({applied})", "", "B", table=True),
        ],
        unit="s",
        fieldConfig={
            "defaults": {
                "unit": "s",
                "thresholds": {"mode": "absolute", "steps": steps},
                "custom": {"cellOptions": {"type": "color-background"}},
            },
            "overrides": [],
        },
        transformations=[
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True},
                    "renameByName": {
                        "Value #A": "age of newest change",
                        "Value #B": "since last applied",
                    },
                },
            },
        ],
    )


def _value_mappings(names: dict[int, tuple[str, str]]) -> list[dict[str, Any]]:
    """Grafana value mappings: each code's text and color."""
    options = {
        str(code): {"text": text, "color": color, "index": index}
        for index, (code, (text, color)) in enumerate(sorted(names.items()))
    }
    return [{"type": "value", "options": options}]


def _status() -> dict[str, Any]:
    """Each group's status now. While the lag exporter is blind its series are gone: an
    instant query and the `last` reducer (not Grafana's default lastNotNull, which keeps
    the last value seen in the time range) show "no data" then, never a stale OK."""
    names = dict(enumerate(zip(STATUS_NAMES, STATUS_COLORS, strict=True)))
    target = _target("max by (group) (portal_sync_consumer_status)", "{{group}}")
    target.update({"instant": True, "range": False})
    return _panel(
        "stat",
        "Consumer status (Burrow-like window)",
        (0, 18, 6, 8),
        [target],
        fieldConfig={
            "defaults": {
                "mappings": _value_mappings(names),
                "unit": "none",
                "noValue": NO_DATA,
                # Only "no data" takes the base color: the statuses have their mappings'.
                "color": {"mode": "thresholds"},
                "thresholds": {"mode": "absolute", "steps": [{"color": "text", "value": None}]},
            },
            "overrides": [],
        },
        options={
            "colorMode": "background",
            "textMode": "value_and_name",
            "reduceOptions": {"calcs": ["last"], "fields": "", "values": False},
        },
    )


def _processes_up() -> dict[str, Any]:
    """`up` per process now: 0 red "down", 1 green "up" (Grafana's default thresholds,
    green below 80, would show a process down in green). An instant query and the `last`
    reducer, as `_status`: a process gone from service discovery (scaled to 0, a pod
    replaced) is no longer shown, where a range query kept its last `up`, 1, for the whole
    time range (PortalSyncWorkerMissing pages for a job with no process at all)."""
    steps = [{"color": "red", "value": None}, {"color": "green", "value": 1}]
    target = _target(f"up{{{JOBS}}}", "{{job}} {{instance}}")
    target.update({"instant": True, "range": False})
    return _panel(
        "stat",
        "Processes up",
        (16, 34, 8, 8),
        [target],
        fieldConfig={
            "defaults": {
                "mappings": _value_mappings({0: ("down", "red"), 1: ("up", "green")}),
                "unit": "none",
                "noValue": NO_DATA,
                "color": {"mode": "thresholds"},
                "thresholds": {"mode": "absolute", "steps": steps},
            },
            "overrides": [],
        },
        options={
            "colorMode": "background",
            "textMode": "value_and_name",
            "reduceOptions": {"calcs": ["last"], "fields": "", "values": False},
        },
    )


def _variables() -> list[dict[str, Any]]:
    def query(name: str, definition: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": name,
            "type": "query",
            "datasource": DATASOURCE,
            "definition": definition,
            "query": {"query": definition, "refId": f"{name}-variable"},
            "refresh": 2,
            "multi": True,
            "includeAll": True,
            "allValue": ".*",
            "current": {"text": "All", "value": "$__all"},
            "sort": 1,
        }

    return [
        {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
        },
        # Every registered source too, not only those that delivered: a province that never
        # did is the one to find (PortalSyncSourceNeverDelivered).
        query("source", f"query_result({SOURCES_QUERY})") | {"regex": '/source="([^"]+)"/'},
        query(
            "entity", 'label_values(portal_sync_sync_lag_seconds_count{source=~"$source"}, entity)'
        ),
    ]


SOURCES_QUERY = (
    "max by (source) (portal_sync_source_registered) or "
    "max by (source) (portal_sync_source_last_change_timestamp_seconds)"
)


def dashboard(t: Thresholds = DEFAULT) -> dict[str, Any]:
    lag_sel = "{" + SEL + "}"
    objective = _edge(t.objective_seconds)
    within = (
        "sum by (source) (rate(portal_sync_sync_lag_seconds_bucket"
        f'{{{SEL},le="{objective}"}}{RATE}))'
        f" / sum by (source) (rate(portal_sync_sync_lag_seconds_count{lag_sel}{RATE}))"
    )
    partition = "{{group}} {{topic}}[{{partition}}]"
    panels = [
        _panel(
            "timeseries",
            "Sync lag p50 / p95 / p99 per source (source commit → store commit)",
            (0, 0, 12, 10),
            _quantiles("portal_sync_sync_lag_seconds", "source", lag_sel),
            unit="s",
        ),
        _freshness(t),
        _panel(
            "timeseries",
            f"Share of changes within the objective ({t.objective_seconds:g}s)",
            (0, 10, 12, 8),
            [_target(within, "{{source}}")],
            unit="percentunit",
        ),
        _panel(
            "timeseries",
            "Events per second by outcome",
            (12, 10, 12, 8),
            [
                _target(
                    f"sum by (outcome) (rate(portal_sync_events_total{lag_sel}{RATE}))",
                    "{{outcome}}",
                )
            ],
            unit="ops",
        ),
        _status(),
        _panel(
            "timeseries",
            "Consumer lag per partition (messages)",
            (6, 18, 9, 8),
            [
                _target(  # max: two exporters (two hosts) export the same partition
                    "max by (group, topic, partition) (portal_sync_consumer_lag_messages)",
                    partition,
                )
            ],
        ),
        _panel(
            "timeseries",
            "Consumer lag per partition (age of oldest unapplied message)",
            (15, 18, 9, 8),
            [
                _target(
                    "max by (group, topic, partition) (portal_sync_consumer_lag_seconds)", partition
                )
            ],
            unit="s",
        ),
        _panel(
            "timeseries",
            "Dead letters per second by reason",
            (0, 26, 8, 8),
            [
                _target(
                    f"sum by (reason) (rate(portal_sync_dead_letters_total{RATE}))", "{{reason}}"
                )
            ],
            unit="ops",
        ),
        _panel(
            "timeseries",
            "Store commit time",
            (8, 26, 8, 8),
            _quantiles("portal_sync_store_commit_duration_seconds", ""),
            unit="s",
        ),
        _panel(
            "timeseries",
            "Store batch size (events per transaction)",
            (16, 26, 8, 8),
            _quantiles("portal_sync_store_batch_events", ""),
        ),
        _panel(
            "timeseries",
            "Produced events per second by source",
            (0, 34, 8, 8),
            [
                _target(
                    f"sum by (source) (rate(portal_sync_produced_events_total{lag_sel}{RATE}))",
                    "{{source}}",
                )
            ],
            unit="ops",
        ),
        _panel(
            "timeseries",
            "Producer cursor lag and source errors",
            (8, 34, 8, 8),
            [
                _target(
                    'max by (source) (portal_sync_source_cursor_lag_seconds{source=~"$source"})',
                    "{{source}} cursor lag (s)",
                ),
                _target(
                    "sum by (source, kind) (increase(portal_sync_source_errors_total"
                    f'{{source=~"$source"}}{RATE}))',
                    "{{source}} {{kind}} errors",
                    "B",
                ),
            ],
        ),
        _processes_up(),
        _panel(
            "timeseries",
            "Batch time by phase (mean per batch): check runs while the batch before is "
            "applied; read, merge, write and commit make up its store transaction",
            (0, 42, 24, 8),
            [
                _target(
                    f"sum by (phase) (rate({PHASE}_sum{RATE})) / "
                    f"sum by (phase) (rate({PHASE}_count{RATE}))",
                    "{{phase}}",
                )
            ],
            unit="s",
        ),
    ]
    for number, panel in enumerate(panels, start=1):
        panel["id"] = number
    return {
        "uid": "portal-sync",
        "title": "portal-sync: sync lag and freshness",
        "tags": ["portal-sync"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": _variables()},
        "annotations": {"list": []},
        "panels": panels,
    }


def expressions(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard: its panels' targets and its variables'."""
    exprs = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs
