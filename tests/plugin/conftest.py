"""The plugin's own tests run user test files in-process with pytester."""

pytest_plugins = ["pytester"]
