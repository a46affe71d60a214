"""Reading a campaign output directory (docs/campaign.md) for ``lassfuzz stats`` and ``report``."""
