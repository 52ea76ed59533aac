"""Test kits for exo and its plugins (real processes, real servers)."""
