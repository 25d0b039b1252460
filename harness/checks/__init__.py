"""The checklist's diagnostics, one package per stage: data/, model/, training/."""
