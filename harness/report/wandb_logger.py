"""Weights & Biases logging (placeholder: being implemented)."""


def log_run(rc, result, report, output_dir, plot_files):
    return None
