from portal_sync.cli import app

app(prog_name="portal-sync")
