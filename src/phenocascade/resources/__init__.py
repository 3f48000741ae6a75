"""Packaged data: the default topology and the Avro schemas."""
