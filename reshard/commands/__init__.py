"""What each command of the CLI does, callable from Python: convert, consolidate, verify, inspect, publish."""
