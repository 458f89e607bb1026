"""The daemon's edges: gRPC Control/Agent services, the HTTP side, sd_notify."""
