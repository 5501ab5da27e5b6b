"""Built-in pipeline stages, one small module each (see router.core.pipeline for the contract)."""
