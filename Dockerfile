# The pumpfleet image: the `pumpfleet` command (ingest, agent, sim, db migrate, alerts).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pumpfleet ./pumpfleet
COPY device_agent ./device_agent
COPY ingest ./ingest
COPY sim_fleet ./sim_fleet
COPY dashboards ./dashboards
RUN pip install --no-cache-dir . && useradd --system pumpfleet
USER pumpfleet
ENTRYPOINT ["pumpfleet"]
CMD ["--help"]
