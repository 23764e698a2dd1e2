"""agentgate: an execution gateway between AI agents and the services they act on.

Holds ``__version__``. The package's map (each module, what it owns and imports) is in
README.md, "Development".

Imports: nothing.
"""

__version__ = "0.1.0"
