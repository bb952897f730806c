"""The sentry: pqcnet's protected RPC edge, and the client sidecar.

QSTP tunnels terminate here; an RPC reaches a backend only after its session
assertion, the ACL, the tenant namespace and both rate-limit layers admit it, and
after the identity sanitizer rewrote it. Start at :mod:`pqcnet.sentry.core` (the pipeline),
:mod:`pqcnet.sentry.server` (the tunnel loop) and :mod:`pqcnet.sentry.sidecar` (the client side);
:mod:`pqcnet.sentry.wire` documents how an RPC travels over a QSTP stream.
"""
