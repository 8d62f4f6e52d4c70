"""Runnable scenes (``python -m scenes.<name>``), the interactive viewer, and small mesh assets."""
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
