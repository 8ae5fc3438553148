"""Executing a job: reading chunks, the copy engine, rank files and their OS calls, staging and atomic promotion."""
