"""`python -m services.reporting`: runs the reporting service."""

from services.reporting.app import build
from tally.runtime.config import ServiceName
from tally.runtime.server import run_service

if __name__ == "__main__":
    run_service(ServiceName.REPORTING, build)
