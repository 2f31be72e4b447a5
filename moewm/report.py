"""``python -m moewm.report SWEEP_DIR``: re-summarise a finished sweep (kept here as a public entry point;
the code lives in :mod:`moewm.app.report`)."""

from moewm.app.report import main

if __name__ == "__main__":
    raise SystemExit(main())
