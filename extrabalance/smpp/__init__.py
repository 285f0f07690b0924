"""SMPP 3.4 for the node (ESME) and the bundled SMSC/USSD-gateway simulator.

Sans-IO core: `pdu` (codec, framer), `text` (GSM 7-bit/UCS2, split/reassembly,
receipts), `session` (state table), `ussd` (USSD builders/parser). asyncio adapters:
`connection` (one session on one TCP stream), `client` (Esme), `server` (Smsc).
See docs/smpp.md.
"""
