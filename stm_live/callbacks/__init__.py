"""Bluesky callbacks: live reconstruction, tip monitor."""
