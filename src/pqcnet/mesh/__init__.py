"""The control plane: signed envelopes over Waku, directives, gossip, DTN, DAG sync.

Where things are (sans-IO cores first, then what does I/O):

* ``envelope`` — sign / seal / verify control messages; ``messages`` — their bodies;
  ``directives`` — governance directives, the threshold policy and the handler
  protocol (handlers answer an ``Outcome``); ``peers`` — peer table and routing
  cache; ``dtn`` — the bundle store; ``crl`` — the gate CA-signed CRL updates pass;
  ``journal`` — a small durable "done already" set; ``errors``, ``metrics``;
* ``transport`` — the one seam to Waku (in-process hub); ``waku`` — the transport over
  one or more Waku nodes, failing over between them; ``waku_rest`` — one node's REST
  client;
* ``agent`` — :class:`~pqcnet.mesh.agent.ControlPlaneAgent`, which owns a
  ``publisher`` (the way out), ``gossip``, ``dagsync`` and ``applier`` (the one path
  of every directive: verify, refuse replays, anchor first, apply, count outcomes) as
  composed parts, and talks to the QS-DAG through ``ledger`` (the port it needs) /
  ``qsdag_port`` (the real ledger behind it); ``slashing`` — the indexer that turns
  ledger findings into slashing proposals; ``pipeline`` — evidence → proposal →
  slash, run by the node runtime on a timer;
  ``config`` — :class:`~pqcnet.mesh.config.AgentConfig`.
"""
