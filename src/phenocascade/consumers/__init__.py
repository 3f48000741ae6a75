"""phenocascade.consumers."""
