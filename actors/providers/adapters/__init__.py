"""Wrappers that compose providers without knowing their vendor: failover
chains with circuit breakers (DESIGN §3). They implement the same contracts
as the providers they wrap, so a session cannot tell a chain from one provider."""
