"""phenocascade.store."""
