"""End-to-end tests: the relay and the daemon run as processes, reached as a user would."""
