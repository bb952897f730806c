"""Small helpers shared by every layer (bounded YAML reader, …).

Imports nothing from pqcnet but :mod:`pqcnet.errors`: it sits at the bottom of the
layer order next to it."""
