"""Experiment tracking: the tracker protocol (base), MLflow (mlflow), a tracked run (session),
the delivery queue (outbox), per-host system metrics (sysmetrics) and the upload command for
undelivered records (upload)."""
