"""Helpers shared by the test tiers: importable as `helpers.*` (pytest adds tests/ to sys.path)."""
