"""What the gateway's handlers receive by dependency injection, and where it comes from.

A handler names a parameter ``services: ServicesDep`` (or ``admission: AdmissionDep``) and
Litestar passes the app's instance (``app.py`` registers the providers); no handler reaches
into ``app.state`` itself.
"""

from __future__ import annotations

from typing import cast

from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import SkipValidation

from functions.gateway.quotas import Admission
from shared.function import Services

# Our own objects, not client input: Litestar is told not to validate them (it would
# resolve every annotation of the clients they hold).
ServicesDep = SkipValidation[NamedDependency[Services]]
"""The process's clients: NATS, the object store, settings, telemetry."""
AdmissionDep = SkipValidation[NamedDependency[Admission]]
"""Backpressure and the per-tenant active-job cap (one per app: it caches)."""


def _services(state: State) -> Services:
    return cast(Services, state.services)


def _admission(state: State) -> Admission:
    return cast(Admission, state.admission)


def dependencies() -> dict[str, Provide]:
    """The providers, for the app's ``dependencies``."""
    return {"services": Provide(_services, sync_to_thread=False),
            "admission": Provide(_admission, sync_to_thread=False)}
