"""The benchmark (``python -m moewm.bench``): a timing harness, its sections, and the Markdown report."""
