"""Offline counterfactual fills and the pipeline that turns a raw dataset into shards."""
