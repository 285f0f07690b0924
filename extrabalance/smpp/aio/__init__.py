"""The SMPP transport: asyncio connections (window, timers), the ESME client and the
SMSC-side server. The PDU codec, the session state machine and text handling live one
level up and do no IO."""
