"""`portal-sync demo`, by concern: population, sample systems, portal feed, the run's
model, scenario, run, self-check."""

from portal_sync.demo.model import DemoError
from portal_sync.demo.run import run_demo

__all__ = ["DemoError", "run_demo"]
