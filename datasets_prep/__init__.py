"""Raw corpora -> Parquet shard datasets (``_manifest.json`` + ``shard-*.parquet``).

Entry points: ``datasets_prep.prep.run_prep`` (YAML-driven prep), ``datasets_prep.shards``
(the shard/manifest contract the training side reads), ``datasets_prep.readers`` (input layouts).
"""
