"""A host sample -> the wire contract (eptwatch.v1.HostReport).
"""
