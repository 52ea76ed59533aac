"""Code generated from node_service.proto and link.proto by `make proto`; do not edit."""
