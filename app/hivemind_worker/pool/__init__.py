"""The reference Node Pool: gRPC server, SQLite store and a small client, for LANs and tests."""
