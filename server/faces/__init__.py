"""The read side: gRPC Query, HTTP routes, /metrics, the fleet page and host pages.
"""
