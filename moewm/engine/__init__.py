"""The watermark engine: keys, routing capture, the LSH encoder and key banks, scoring, exact statistics, calibration.

It knows nothing of schemes, model loading, evaluation or the app; everything above imports it.
"""
