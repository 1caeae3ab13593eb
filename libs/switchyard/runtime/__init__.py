"""Process plumbing shared by the services: logging, signals, gRPC server lifecycle."""
