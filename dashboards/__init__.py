"""dashboards: the Grafana dashboards as code (grafanalib) and their provisioning.

Four dashboards (fleet overview, pump detail, alerts, pipeline health) whose queries all come
from `pumpfleet.schema.panels`, two provisioned datasources with fixed uids (the database as the
read-only role, and Prometheus for the ingesters' counters), and one dashboard provider per
folder. `pumpfleet dashboards build [--out DIR]` writes them (`build`); the copy committed in
deploy/grafana/ is what docker-compose.yml gives Grafana, and `check` says whether it drifted.
"""

from dashboards._build import (
    BOARDS,
    DATASOURCES_FILE,
    DEFAULT_OUT,
    PROVIDERS_FILE,
    Board,
    build,
    check,
    render,
)
from dashboards._common import POSTGRES, PROMETHEUS, SCHEMA_VERSION
from dashboards._provisioning import (
    ENVIRONMENT,
    FOLDERS,
    GRAFANA_DASHBOARDS,
    GRAFANA_PROVISIONING,
    Folder,
)

__all__ = [
    "BOARDS",
    "DATASOURCES_FILE",
    "DEFAULT_OUT",
    "ENVIRONMENT",
    "FOLDERS",
    "GRAFANA_DASHBOARDS",
    "GRAFANA_PROVISIONING",
    "POSTGRES",
    "PROMETHEUS",
    "PROVIDERS_FILE",
    "SCHEMA_VERSION",
    "Board",
    "Folder",
    "build",
    "check",
    "render",
]
