"""Protobuf sources and their generated Python (regenerate with ``make proto``)."""
