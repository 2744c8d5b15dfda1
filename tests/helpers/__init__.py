"""Test helpers: tiny random-init models of every family, built without downloads."""
