"""`portal-sync adapters …` and `portal-sync produce`: the producer adapter kit's commands."""

from __future__ import annotations

import logging
import signal
import threading
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from observability.terminal import markup, plain
from portal_sync.cli.options import PORT, settings_from
from producers.sdk import Adapter
from schemas.errors import until_available

if TYPE_CHECKING:
    from portal_sync.settings import Settings
    from producers.conformance import ConformanceReport
    from producers.deployment import Deployment

adapters_app = typer.Typer(
    no_args_is_help=True, help="Source adapters: list installed, check, scaffold."
)
console = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Deployment file (TOML)")]
SourceOpt = Annotated[str | None, typer.Option("--source", "-s", help="Only this source id")]


def _metrics_host(deployment: Deployment, settings: Settings) -> str:
    """The deployment file's `[producer] metrics_host`, else `PORTAL_SYNC_METRICS_HOST` (as
    the worker and the lag exporter read it), whose default is 127.0.0.1."""
    producer = deployment.producer
    if "metrics_host" in producer.model_fields_set:
        return producer.metrics_host
    return settings.metrics_host


@adapters_app.command("list")
def list_adapters() -> None:
    """Adapters installed in this environment (entry-point group portal_sync.adapters)."""
    from producers.adapters import installed, load

    table = Table(title="installed adapters")
    for column in ("name", "package", "entity", "cursor", "sorted", "deletes", "description"):
        table.add_column(column)
    for name, entry in sorted(installed().items()):
        try:
            adapter = load(name)
        except Exception as error:
            failure = f"[red]cannot load: {type(error).__name__}[/red]"
            table.add_row(name, _package(entry), "", "", "", "", failure)
            continue
        doc = (adapter.__doc__ or "").strip().splitlines()
        table.add_row(
            name,
            _package(entry),
            adapter.entity or "(varies)",
            adapter.cursor,
            "yes" if adapter.sorted_output else "no",
            _deletes(adapter),
            doc[0] if doc else "",
        )
    out.print(table)


def _deletes(adapter: type[Adapter]) -> str:
    if adapter.emits_deletes:
        return "yes"
    configurable = any(name.startswith("deleted") for name in adapter.Config.model_fields)
    return "if configured" if configurable else "no"


def _package(entry: EntryPoint) -> str:
    return entry.dist.name if entry.dist is not None else entry.module


@adapters_app.command("check")
def check(
    config: ConfigOpt,
    source: SourceOpt = None,
    limit: Annotated[
        int | None, typer.Option("--limit", "-n", help="Read about N events per source")
    ] = None,
) -> None:
    """Run adapters against their real sources WITHOUT publishing; pass/fail per check."""
    from portal_sync.settings import Settings, deployment_settings
    from producers.conformance import check_adapter
    from producers.deployment import load_deployment

    deployment = load_deployment(config)
    key = deployment_settings(deployment, Settings.from_flags()).reference_key()
    entries = deployment.enabled(source)
    adapters = [(entry, deployment.adapter(entry, key)) for entry in entries]
    failed = 0
    for entry, adapter in adapters:
        try:
            report = check_adapter(adapter, entry.id, entry.adapter, limit)
        finally:
            adapter.close()
        out.print(report_table(report))
        failed += not report.passed
    out.print(f"{len(adapters) - failed} of {len(adapters)} sources pass")
    raise typer.Exit(1 if failed else 0)


@adapters_app.command("new")
def new(
    name: Annotated[str, typer.Argument(help="Adapter name, e.g. hcm-oracle")],
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Parent directory (default: current)")
    ] = None,
) -> None:
    """Scaffold a plug-in package: pyproject (entry point), adapter, example config, test."""
    from producers.scaffold import scaffold

    created = scaffold(name, directory or Path.cwd())  # a bad name: 2; one taken: refused
    console.print(f"created {created}")
    console.print(f"next: pip install -e {created} && cd {created} && pytest")


def produce(
    ctx: typer.Context,
    config: ConfigOpt,
    once: Annotated[bool, typer.Option("--once", help="Run every source once, then exit")] = False,
    source: SourceOpt = None,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", **PORT, help="/metrics port (0: off)")
    ] = None,
    metrics_host: Annotated[
        str | None,
        typer.Option(
            "--metrics-host",
            help="/metrics bind address (else the file's metrics_host, else "
            "PORTAL_SYNC_METRICS_HOST)",
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="Dir of the sources' state files (else the file's)"),
    ] = None,
    signing_key_file: Annotated[
        Path | None,
        typer.Option(
            "--signing-key-file",
            help="Signing key of the sources' events (else the file's [producer] "
            "signing_key_file; a source's own still wins)",
        ),
    ] = None,
    bootstrap: Annotated[
        str | None,
        typer.Option(
            "--bootstrap",
            envvar="PORTAL_SYNC_KAFKA_BOOTSTRAP",
            help="Kafka bootstrap servers: the flag wins over the file's kafka.bootstrap, "
            "which wins over the environment",
        ),
    ] = None,
    show_config: Annotated[
        bool,
        typer.Option(
            "--show-config",
            help="Print the configuration (secrets masked) and exit, publishing nothing",
        ),
    ] = False,
) -> None:
    """Run every source of a deployment file: publish their changes to Kafka.
    Serves /metrics, /healthz and /readyz on the deployment's metrics port. --metrics-host
    and --state-dir override the file (a container: the file is a read-only ConfigMap)."""
    from consumers.runtime import tune_garbage_collector
    from observability.http import serve
    from observability.web_config import load_web_config
    from portal_sync.settings import deployment_settings
    from producers.deployment import load_deployment
    from producers.metrics import SOURCE_ERRORS
    from producers.produce import ProduceResult
    from producers.produce import produce as run_produce
    from transport.admin import ensure_topics

    deployment = load_deployment(config)
    if show_config:  # a look at the file: never a run (it would publish, and move states)
        out.print(deployment.redacted(), markup=False, highlight=False)
        return
    settings = deployment_settings(deployment, settings_from(bootstrap))
    given = ctx.get_parameter_source("bootstrap")
    if bootstrap and given is not None and given.name == "COMMANDLINE":
        # the flag wins over the file; the environment (the chart sets it for every pod)
        # does not
        settings = settings.model_copy(update={"kafka_bootstrap": bootstrap})
    reference_key = settings.reference_key()
    deployment.use_defaults(done_retention_days=settings.done_files_retention_days)
    port = deployment.producer.metrics_port if metrics_port is None else metrics_port
    host = metrics_host if metrics_host is not None else _metrics_host(deployment, settings)
    if state_dir is not None:  # the current directory's, as the key file's: not the file's dir
        deployment.producer.state_dir = state_dir.absolute()
    if signing_key_file is not None:
        deployment.producer.signing_key_file = signing_key_file.absolute()  # not the file's dir
    result = ProduceResult()
    web = load_web_config(settings.metrics_web_config_file) if port else None
    if port and not once:
        serve(port, host, result.healthy, result.ready, web=web)
    elif port:
        serve(port, host, web=web)
    # A run in progress ends at its next item, its progress saved; a second Ctrl-C
    # interrupts at once (the saving waits for the broker).
    stop = threading.Event()
    stopped_by: list[int] = []

    def stopping(signum: int, _frame: Any) -> None:
        stopped_by.append(signum)
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, stopping)
    signal.signal(signal.SIGINT, stopping)
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:  # a closed session; not `nohup`
        signal.signal(signal.SIGHUP, stopping)

    def topics_ready() -> list[str]:
        return ensure_topics(
            settings.connection(), settings.topics(), settings.topics().change_topics()
        )

    def cluster_away(_error: Exception) -> None:
        # Counted as a run's failed publish is: PortalSyncSourceErrors pages for a wait
        # that does not end (a wrong address or listener looks like a broker away).
        for contract_source in {e.contract_source for e in deployment.enabled(source)}:
            SOURCE_ERRORS.labels(contract_source, "publish_error").inc()

    if once:  # a job: its caller hears at once that the cluster is away
        topics_ready()
    elif (
        until_available(
            topics_ready, "produce start", stop, logging.getLogger(__name__), on_retry=cluster_away
        )
        is None
    ):
        return  # stopped while waiting for the cluster: nothing was read or sent
    tune_garbage_collector()
    result = run_produce(
        deployment,
        settings.connection(),
        settings.topics(),
        once=once,
        stop=stop,
        only=source,
        result=result,
        reference_key=reference_key,
    )
    for source_id, stats in sorted(result.stats.items()):
        console.print(
            f"{source_id}: published {stats.published}, dead-lettered {stats.dead_lettered}"
        )
    if result.failed:
        console.print(f"[red]failed:[/red] {', '.join(sorted(result.failed))}")
        raise typer.Exit(1)
    if once and stopped_by:  # not a complete pass: `produce --once && next` must tell
        console.print("stopped before the pass was complete: run it again for the rest")
        raise typer.Exit(128 + stopped_by[0])


def report_table(report: ConformanceReport) -> Table:
    """A Rich table of one conformance report (producers.conformance)."""
    verdict = "[green]PASS[/green]" if report.passed else "[red]FAIL[/red]"
    title = markup("{} ({}): {} events " + verdict, report.source_id, report.adapter,
                   len(report.first.emitted))  # fmt: skip
    table = Table(title=title)
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    table.add_column("failing examples")
    for result in report.results:
        mark = "[green]pass[/green]" if result.passed else "[red]FAIL[/red]"
        examples = Text("\n").join(map(plain, result.examples))  # rows' origins: source data
        table.add_row(result.name, mark, plain(result.detail), examples)
    for warning in report.warnings:
        table.add_row("warning", "[yellow]warn[/yellow]", plain(warning), "")
    return table
