"""The node runtime: one process running a relayer or a sentry *with* its control plane.

:mod:`pqcnet.runtime.config` reads and validates the node file; :mod:`pqcnet.runtime.node`
starts the role's node, a :class:`~pqcnet.mesh.agent.ControlPlaneAgent` on the configured
transport, and the existing bindings (:mod:`pqcnet.runtime.governance`,
:mod:`pqcnet.runtime.relay_reports`) between them. Nothing here implements protocol logic.
"""
