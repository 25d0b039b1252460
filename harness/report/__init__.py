"""The report: report.json, report.md with plots, the terminal view, and W&B logging."""
