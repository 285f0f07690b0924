"""Bundled network simulators: IN/OCS, SMSC/USSD gateway, recharge publisher."""
