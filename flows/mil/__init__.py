"""The encoder + attention-MIL pipeline as Prefect flows (``flows.mil.pipeline``)."""
