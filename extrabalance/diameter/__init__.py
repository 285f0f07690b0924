"""diameter"""
