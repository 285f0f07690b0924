"""The Diameter transport: asyncio connections, the peer table driven over sockets,
request routing and timers. Everything protocol-shaped it uses (the codec, the peer
state machine, the constants) lives one level up and does no IO."""
