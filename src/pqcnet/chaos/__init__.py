"""History checker and fault harness for the relayer's delivery guarantees (issue 11).

Jepsen's idea at this project's scale: the clients record every publish, ack and
application-ack with (customer, channel, seq, payload digest) in history files
(:mod:`.history`); a fault schedule kills and pauses the relayer, the clients and the
broker while they run (:mod:`.harness`, clients in :mod:`.clients`); afterwards
:mod:`.checker` computes, from the histories and the relayer's metering only,
lost-acknowledged, duplicated-to-application, out-of-order, phantom and mis-billed
frames. ``pqcnet chaos run`` / ``pqcnet chaos check`` drive it.
"""
