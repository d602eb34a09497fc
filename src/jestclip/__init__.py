"""jestclip: joint example selection (JEST) for contrastive image-text training."""

__version__ = "0.1.0"
