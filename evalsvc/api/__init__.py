"""gRPC servicers: translate protobuf requests into domain calls and domain errors into statuses."""
