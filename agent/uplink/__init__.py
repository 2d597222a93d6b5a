"""Getting reports to the aggregator: the durable spool and the gRPC delivery stream.
"""
