"""The plugin's own tests run user test files in-process with pytester (enabled with
``-p pytester`` in pyproject.toml's addopts: pytest refuses pytest_plugins here)."""
