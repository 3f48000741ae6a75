"""phenocascade.consumers: the processes that consume the cascade's topics.

Every consumer group is named in the topology: the tier workers', the joiner's, and the
annotation loop's (``sink_group``, ``retrainer_group``).
"""
