"""phenocascade.ui."""
