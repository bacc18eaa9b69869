"""Experiments: each is a config class, a function that runs it, and a result object.

The function writes the same result folder as the CLI when given ``out`` and returns the data in memory
either way; the CLI commands only parse options, build the config, call the function and print.
"""
