"""`python -m services.ingest`: runs the ingest service."""

from services.ingest.app import build
from tally.runtime.config import ServiceName
from tally.runtime.server import run_service

if __name__ == "__main__":
    run_service(ServiceName.INGEST, build)
