"""Generated protobuf code (sources in the repository's ``proto/``; regenerate with ``make proto``).

Nothing hand-written lives here; cores convert at their boundary instead of passing
``_pb2`` objects around."""
