"""phiforge: the Phi recipe (textbook-quality data -> small Phi models -> evaluation) as one tool.

Importing the package is cheap: torch and friends load only when a submodule that needs them is imported.
"""

__version__ = "0.1.0"
