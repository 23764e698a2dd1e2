"""agentgate: an execution gateway between AI agents and the services they act on."""

__version__ = "0.1.0"
