"""Small synthetic tasks with their data generators and networks.

A task module exposes ``task(config) -> fasttangent.train.Task`` so that
``fasttangent train CONFIG.toml`` can build it from ``task = "module:function"``.
"""
