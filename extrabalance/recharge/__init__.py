"""Recharge notifications from the prepaid IN over MQTT.

``events`` is the payload format (shared with the bundled recharge publisher);
``listener`` is the node's at-least-once subscriber. Nothing is imported here, so
importing ``extrabalance.recharge.events`` does not pull in the MQTT client.
"""
