"""The test kit for exo and its plugins: real processes, real servers, no mocks.

Public, like the names in `exo_core.__all__` (see `docs/plugins.md`):

- `engine_checks`: the engine contract as checks (`Subject`, `CHECKS`, `run`) for a plugin's tests;
- `node`, `chat`, `api_url`, `Answer`: a node in the test's process and a request through it;
- `check_registration`, `check_lazy_imports`: is a plugin installed and wired;
- `engine_class`, `default_engine`, `model_card`: what the installed plugins registered;
- `Cluster` (`exo_core.testing.cluster`): several `exo run` processes on 127.0.0.1 forming a
  cluster (`Cluster.manual`).
"""

from exo_core.engines.dummy import DUMMY_ANSWER  # what the built-in dummy engine answers
from exo_core.testing import engine_checks
from exo_core.testing.cluster import Cluster
from exo_core.testing.inprocess import Answer, Usage, api_url, chat, node
from exo_core.testing.registration import (
    Registration,
    check_lazy_imports,
    check_registration,
    default_engine,
    engine_class,
    model_card,
)


def quiet_logs(level: str = "warning") -> None:
    """exo's plain console logging at `level` (structlog's default renders slow rich tracebacks)."""
    from exo_core.log import configure_logging

    configure_logging("console", level)


__all__ = [
    "DUMMY_ANSWER",
    "Answer",
    "Cluster",
    "Registration",
    "Usage",
    "api_url",
    "chat",
    "check_lazy_imports",
    "check_registration",
    "default_engine",
    "engine_checks",
    "engine_class",
    "model_card",
    "node",
    "quiet_logs",
]
