"""Quality evaluation: the paper's metrics on held-out photos, and the report (imports ``models``)."""
