"""Diameter (RFC 6733 base, RFC 4006/8506 credit control, 3GPP Gy) for the node and
the IN simulator alike.

Modules: ``dictionary`` (the AVP/command/result-code tables), ``constants``
(generated names), ``codec`` (bytes ⇄ Message, validation), ``gy`` (CCR/CCA in
minor units, Session-Ids), ``peer`` (sans-IO peer state machine), ``node``
(asyncio adapter). See docs/diameter.md.
"""
