"""`python -m services.analytics`: runs the analytics service."""

from services.analytics.app import build
from tally.runtime.config import ServiceName
from tally.runtime.server import run_service

if __name__ == "__main__":
    run_service(ServiceName.ANALYTICS, build)
