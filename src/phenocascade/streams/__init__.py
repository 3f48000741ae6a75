"""phenocascade.streams."""
