"""miles-router: an RL rollout router in front of SGLang workers."""

__version__ = "0.1.0"
