"""Peers: the gRPC node service and discovery."""
