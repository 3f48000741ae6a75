"""phenocascade.infra."""
