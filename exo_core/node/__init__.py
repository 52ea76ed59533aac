"""The node side: origin and stage of the request flow, messages, partitioning, topology, sampling."""
