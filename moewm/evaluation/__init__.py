"""Evaluation of a job's texts: detection metrics against the nulls, attacks, quality, length curves, geometry, validity.

It consumes the job's detections and captures; it imports the schemes, models and engine, never the app.
"""
