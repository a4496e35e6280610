"""Ways to run rillet beyond ``rillet serve``: ``rillet.deploy.ray`` (Ray Serve)."""
