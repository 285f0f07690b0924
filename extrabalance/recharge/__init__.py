"""recharge"""
