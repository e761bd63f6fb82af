"""From the command line to a checked plan: every input checked before Ray or MLflow starts."""
