"""The application on top: the Hydra entry point, schema, job pipeline, detect mode, callbacks, tracking, report."""
