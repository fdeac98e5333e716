"""report.json (stable keys, documented in README) and a readable report.md."""
