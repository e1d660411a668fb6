"""Data: sources, checks and splitting, the fitted preprocessor, array files."""
