"""ctxguard in the tools a Flask team already runs (Prometheus, Grafana, ...).

Nothing here is imported by ``ctxguard`` itself: each module is used by the
tool or the command that needs it.
"""
