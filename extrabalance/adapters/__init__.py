"""Adapters between the network protocols and the application layer: they translate
bytes-level messages into service calls and back, and decide nothing."""
