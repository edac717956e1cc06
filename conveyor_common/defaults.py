"""Default ports, shared by the services' flags, docker-compose.yml and the
local stack runner (a test checks the compose file against these)."""

SCHEDULER_PORT = 50051
WORKER_PORT = 50052
GATEWAY_PORT = 50053

SCHEDULER_METRICS_PORT = 9101
WORKER_METRICS_PORT = 9102
GATEWAY_METRICS_PORT = 9103

# How long a client waits for a channel to become ready before failing a call.
CONNECT_TIMEOUT_S = 10.0
