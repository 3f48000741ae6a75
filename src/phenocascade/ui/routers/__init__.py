"""One router per resource of the annotation app."""
