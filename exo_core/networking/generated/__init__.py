"""Code generated from node_service.proto by `make proto`; do not edit."""
