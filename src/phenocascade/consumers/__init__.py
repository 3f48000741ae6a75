"""phenocascade.consumers: the processes that consume the cascade's topics.

The consumer groups of the tier workers and of the joiner are named in the topology; those
of the annotation loop are these.
"""

SINK_GROUP = "phenocascade-annotation-sink"
RETRAINER_GROUP = "phenocascade-retrainer"
