"""phenocascade.data."""
