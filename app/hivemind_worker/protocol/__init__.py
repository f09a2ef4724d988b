"""Generated gRPC and protobuf stubs for the Node Pool protocol."""
