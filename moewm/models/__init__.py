"""Models: loading real and micro checkpoints, the memory estimator, expert quantization, placement.

Below the app and evaluation, beside the schemes; it imports only the engine and the config.
"""
