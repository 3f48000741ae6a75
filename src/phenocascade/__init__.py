"""phenocascade: a streaming cascade of microscopy image models on Kafka and Cassandra."""

__version__ = "0.1.0"
