"""The REST gateway: JSON over HTTP in front of the gRPC API.

It is a translator only: every route calls the gRPC service over a channel, so authentication,
tenancy, validation and limits are enforced in exactly one place (the gRPC server), and the gateway
never touches the database.
"""
