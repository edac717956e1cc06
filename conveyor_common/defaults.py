"""Default ports, shared by the services' flags, docker-compose.yml and the
local stack runner (a test checks the compose file against these)."""

SCHEDULER_PORT = 50051
# The scheduler's OpenAI-compatible HTTP API (on in `make run` and compose).
SCHEDULER_HTTP_PORT = 8080
WORKER_PORT = 50052
GATEWAY_PORT = 50053

SCHEDULER_METRICS_PORT = 9101
WORKER_METRICS_PORT = 9102
GATEWAY_METRICS_PORT = 9103

# The plaintext health-only ports (--health-port) compose and Kubernetes give
# their probes, which speak neither TLS nor tokens. Off unless asked for.
SCHEDULER_HEALTH_PORT = 50061
WORKER_HEALTH_PORT = 50062
GATEWAY_HEALTH_PORT = 50063

# How long a client waits for a channel to become ready before failing a call
# (a run with its worker or gateway down ends UNAVAILABLE after this).
CONNECT_TIMEOUT_S = 5.0

# Where a service listens unless told otherwise: loopback, so a direct run is
# not reachable from other hosts (compose and Kubernetes pass 0.0.0.0).
DEFAULT_HOST = "127.0.0.1"
