"""Benchmarks that put a number on jetcut's overhead, each against a peer run in the same go.

``python -m loadtests`` (``make bench``) runs them and writes ``loadtests/reports/latest.md``;
see ``loadtests/README.md`` for what each scenario measures and how to read the report.
"""
