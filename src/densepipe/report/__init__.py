"""The HTML report: figures, diagnostics in plain language, one self-contained file."""
