"""stm-live: live Bluesky acquisition and orbital reconstruction for Nanonis STMs."""

__version__ = "0.1.0"
