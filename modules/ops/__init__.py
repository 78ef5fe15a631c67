"""Operating the server: start-up and workers, health probes, metrics, hot reload, the /ui page."""
