"""`python -m services.budget`: runs the budget service."""

from services.budget.app import build
from tally.runtime.config import ServiceName
from tally.runtime.server import run_service

if __name__ == "__main__":
    run_service(ServiceName.BUDGET, build)
