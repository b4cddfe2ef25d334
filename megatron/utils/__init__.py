"""Small helpers shared by several packages (kept free of heavy imports: config.py uses them)."""
