"""Stage 1: capture, what each node of the dynamo graph means (where a conv is matched)."""
