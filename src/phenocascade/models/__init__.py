"""Model backends behind the :class:`~phenocascade.models.base.Stage` contract (no Kafka here)."""
