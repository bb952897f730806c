"""The control plane: signed envelopes over Waku, directives, gossip, DTN, DAG sync.

Where things are (sans-IO cores first, then what does I/O):

* ``envelope`` — sign / seal / verify control messages; ``messages`` — their bodies;
  ``directives`` — governance directives and the threshold policy; ``peers`` — peer
  table and routing cache; ``dtn`` — the bundle store; ``errors``, ``metrics``;
* ``transport`` — the one seam to Waku (in-process hub); ``waku`` — the REST client;
* ``agent`` — :class:`~pqcnet.mesh.agent.ControlPlaneAgent`, which owns a
  ``publisher`` (the way out), ``gossip`` and ``dagsync`` (composed parts), and
  talks to the QS-DAG through ``ledger`` (the port it needs) / ``qsdag_port``
  (the real ledger behind it); ``slashing`` — the indexer that turns ledger
  findings into slashing proposals;
  ``config`` — :class:`~pqcnet.mesh.config.AgentConfig`.
"""
